"""Evaluation of a (LoRA-adapted) MoE model: perplexity, multiple-choice accuracy, generation exact match.

Each task is a library function (train.py and study scripts call them in-process) and a CLI task; records
are data.py's formats, and `evaluate` checks they are the kind the task reads.
  ppl  {"text"}: token-level. A text is encoded as data.encode_example does (BOS as the tokenizer adds it,
       EOS appended); every token after its first is predicted exactly once (texts longer than --seq-len
       are cut into windows overlapping by one token; the context restarts at each). ppl = exp(mean NLL).
  mc   {"query", "choices", "gold"}: log-likelihood multiple choice as lm-evaluation-harness does it: each
       choice scores the summed log-probability of the continuation " " + choice after the query (split at
       the exact token boundary by data.encode_pair). acc: argmax of the sum; acc_norm: argmax of sum /
       len(choice) in characters. Exactly which length: lm-eval's `completion_len = [len(i) for i in
       choices]` over doc_to_choice, i.e. WITHOUT the continuation's leading space (old MultipleChoiceTask
       and v0.4 ConfigurableTask alike). Ties go to the first choice, as np.argmax.
  gen  {"question", "answer"} (GSM8K style): greedy generation (generate.generate, left padding) until EOS, then
       exact match of the final number: the one after the last "####", else the last in the text; commas
       dropped, "3.50" == "3.5". The gold answer is read alike. No stop strings: the model ends with EOS.
       A chat record {"messages"} is read too: the prompt is the conversation before its last assistant turn,
       rendered by the model's chat template with add_generation_prompt=True; the gold is that turn's content.
Each scores a mean over items, with lm-eval's standard error (harness.mean_stderr); `items=[]` collects
one dict per item (--log-samples). --num-fewshot K puts K solved examples before each prompt (evaluation/harness.py).

    python eval.py --model DIR [--adapter DIR] --task mc --data hellaswag.jsonl --out results.json
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch

import generate
import methods
from evaluation import answers, harness
from files import atomic, chat, data, hub
from files import tokenizer

TASKS = {"ppl": ("text",), "mc": ("mc",), "gen": ("qa", "chat")}  # task -> the data.py record kinds it reads

# ----------------------------------------------------------------------------- helpers

def _device(model):  # any callable model(input_ids, attention_mask) -> logits works; no parameters: CPU
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def _inference(model):
    """No gradient, and eval mode (no dropout) for the duration; the model's train/eval mode is restored."""
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        if isinstance(model, torch.nn.Module):
            model.train(was_training)


def _label_logprobs(model, ids, mask, labels, chunk=1024):
    """(B, T) fp32 log p(labels[b, t] | ids[b, :t+1]), 0 where the label is data.IGNORE. Right padding only.
    A model with a `head` (moe.Transformer) gives its final hidden states, and only the labelled rows go
    through the head, `chunk` rows at a time: (chunk, V) fp32 logits at once, never all (B, T, V) (at
    OLMoE's vocabulary, 8 x 2048 tokens: 1.6 GB in bf16, twice that in fp32). Any other callable (the tests'
    fakes) returns its logits, read one sequence at a time."""
    dev = _device(model)
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    mask = None if bool(mask.all()) else mask  # no mask: plain causal attention
    keep = labels != data.IGNORE
    out = torch.zeros(labels.shape, dtype=torch.float32, device=dev)  # (B, T)
    if not hasattr(model, "head"):
        logits = model(ids, mask)  # (B, T, V)
        for b in range(ids.shape[0]):  # one (T, V) fp32 copy at a time
            lp = torch.log_softmax(logits[b].float(), dim=-1)
            out[b] = lp.gather(-1, labels[b].clamp(min=0)[:, None])[:, 0] * keep[b]
        return out
    h = model(ids, mask, hidden=True)[keep]  # (n, D): the labelled positions only
    target = labels[keep]  # (n,)
    lp = [torch.log_softmax(model.head(h[i:i + chunk]).float(), dim=-1).gather(-1, target[i:i + chunk, None])[:, 0]
          for i in range(0, len(target), chunk)]
    if lp:
        out[keep] = torch.cat(lp)
    return out


def _argmax(xs):  # the first index of the largest value, as np.argmax
    return max(range(len(xs)), key=xs.__getitem__)


# ----------------------------------------------------------------------------- perplexity

def perplexity(model, tok, records, batch_size=8, seq_len=2048, progress=None, items=None):
    """{"text"} records -> dict(ppl, nll, tokens): mean token NLL over every token after the first of each
    text (EOS included), ppl = exp(nll). Texts longer than seq_len are windowed (module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    seqs = []  # (record index, window ids)
    for r, rec in enumerate(records):
        ids, _ = data.encode_example(tok, rec, max_len=sys.maxsize)  # [BOS] text EOS
        for i in range(0, max(len(ids) - 1, 1), seq_len - 1):  # window i predicts ids[i+1 : i+seq_len]
            seqs.append((r, ids[i:i + seq_len]))
    seqs.sort(key=lambda s: len(s[1]), reverse=True)  # less padding; the sum does not depend on the order
    nll, count = [0.0] * len(records), [0] * len(records)  # per record
    with _inference(model):
        for i in range(0, len(seqs), batch_size):
            batch = [s for _, s in seqs[i:i + batch_size]]
            ids, mask, labels = data.pad_batch(batch, [[0] + [1] * (len(s) - 1) for s in batch], tok.pad_id)
            lp = _label_logprobs(model, ids, mask, labels).double().sum(-1)  # (B,)
            for b, (r, s) in enumerate(seqs[i:i + batch_size]):
                nll[r] -= lp[b].item()
                count[r] += len(s) - 1
            if progress:
                progress(i + len(batch), len(seqs))
    tokens = sum(count)
    if tokens == 0:
        raise ValueError("perplexity: the records have no token to predict")
    if items is not None:
        items += [dict(index=r, nll=nll[r], tokens=count[r]) for r in range(len(records))]
    return dict(ppl=math.exp(sum(nll) / tokens), nll=sum(nll) / tokens, tokens=tokens)


# ----------------------------------------------------------------------------- multiple choice

def choice_logliks(model, tok, records, batch_size=8, seq_len=2048, progress=None):
    """The summed log-likelihood of " " + choice after the query, for every choice of every mc record
    (a list per record). All (query, choice) pairs are batched together, right-padded, one forward a batch."""
    pairs = []  # (record index, ids, loss mask)
    for r, rec in enumerate(records):
        for choice in rec["choices"]:
            head, tail = data.encode_pair(tok, rec["query"], " " + choice)
            if not head:  # an empty query without BOS: nothing to predict the first token from (lm-eval: EOT)
                head = [tok.bos_id if tok.bos_id is not None else tok.eos_id]
            if len(tail) >= seq_len:
                raise ValueError(f"mc record {r + 1}: choice {choice[:40]!r} alone is longer than seq_len {seq_len}")
            ids = (head + tail)[-seq_len:]  # too long: drop the start of the query, as lm-eval does
            pairs.append((r, ids, [0] * (len(ids) - len(tail)) + [1] * len(tail)))
    order = sorted(range(len(pairs)), key=lambda j: -len(pairs[j][1]))
    ll = [0.0] * len(pairs)
    with _inference(model):
        for i in range(0, len(order), batch_size):
            js = order[i:i + batch_size]
            ids, mask, labels = data.pad_batch([pairs[j][1] for j in js], [pairs[j][2] for j in js], tok.pad_id)
            lp = _label_logprobs(model, ids, mask, labels).double().sum(-1)  # (B,)
            for b, j in enumerate(js):
                ll[j] = lp[b].item()
            if progress:
                progress(i + len(js), len(pairs))
    out = [[] for _ in records]
    for (r, _, _), x in zip(pairs, ll):
        out[r].append(x)
    return out


def multiple_choice(model, tok, records, batch_size=8, seq_len=2048, progress=None, items=None):
    """{"query", "choices", "gold"} records -> dict(acc, acc_norm, their standard errors, gold_nll, n): acc and
    acc_norm as lm-evaluation-harness computes them; gold_nll, the gold choice's negative log-likelihood per
    character (nats), a continuous signal for models too small to rise above chance."""
    acc, acc_norm, nll = [], [], 0.0
    for r, (rec, ll) in enumerate(zip(records, choice_logliks(model, tok, records, batch_size, seq_len, progress))):
        lengths = [len(c) for c in rec["choices"]]  # len(choice), not len(" " + choice)
        per_char = [x / max(n, 1) for x, n in zip(ll, lengths)]
        pick, pick_norm = _argmax(ll), _argmax(per_char)
        acc.append(float(pick == rec["gold"]))
        acc_norm.append(float(pick_norm == rec["gold"]))
        nll -= per_char[rec["gold"]]
        if items is not None:
            items.append(dict(index=r, loglik=ll, chars=lengths, gold=rec["gold"], pick=pick, pick_norm=pick_norm,
                              acc=acc[-1], acc_norm=acc_norm[-1]))
    n = len(records)
    return dict(acc=sum(acc) / n, acc_stderr=harness.mean_stderr(acc), acc_norm=sum(acc_norm) / n,
                acc_norm_stderr=harness.mean_stderr(acc_norm), gold_nll=nll / n, n=n)


# ----------------------------------------------------------------------------- generation

def _cut_left(ids, n, bos_id):  # keep the last n tokens, and BOS in front if the sequence starts with one
    if len(ids) <= n:
        return ids
    bos = ids[:1] if bos_id is not None and ids[:1] == [bos_id] else []
    return bos + ids[len(ids) - (n - len(bos)):]


def generation(model, tok, records, batch_size=8, max_new_tokens=256, seq_len=2048, progress=None, n_samples=5,
               items=None):
    """{"question", "answer"} or chat records -> dict(exact_match, its standard error, n, samples): greedy answers
    (the prompt is the question as it is, or the chat rendered for generation; prompts longer than
    seq_len - max_new_tokens lose their start)."""
    if seq_len - max_new_tokens < 2:
        raise ValueError(f"seq_len {seq_len} leaves no room for a prompt before {max_new_tokens} new tokens")
    asked = [chat.prompt_and_answer(tok, rec) if "messages" in rec else (tok.encode(rec["question"]), rec["answer"])
             for rec in records]  # (prompt ids, gold answer)
    prompts = [_cut_left(ids, seq_len - max_new_tokens, tok.bos_id) for ids, _ in asked]
    order = sorted(range(len(records)), key=lambda j: len(prompts[j]))  # similar lengths: less padding
    outputs, dev = [None] * len(records), _device(model)
    with _inference(model):
        for i in range(0, len(order), batch_size):
            js = order[i:i + batch_size]
            ids, mask, _ = data.pad_batch([prompts[j] for j in js], [[0] * len(prompts[j]) for j in js],
                                          tok.pad_id, side="left")  # (B, T) prompts end at the same column
            out = generate.generate(model, ids.to(dev), mask.to(dev), max_new_tokens=max_new_tokens,
                                    eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)  # (B, T + new)
            for b, j in enumerate(js):
                new = out[b, ids.shape[1]:].tolist()
                outputs[j] = tok.decode(new[:new.index(tok.eos_id)] if tok.eos_id in new else new)
            if progress:
                progress(i + len(js), len(records))
    golds = [gold for _, gold in asked]
    correct = answers.exact_match(outputs, golds)
    asks = [rec["question"] if "question" in rec else [m for m in rec["messages"] if m["role"] == "user"][-1]["content"]
            for rec in records]  # a chat: its last user turn
    log = [dict(index=r, question=q, output=o, pred=answers.extract_number(o), gold=answers.extract_number(g),
                correct=c) for r, (q, o, g, c) in enumerate(zip(asks, outputs, golds, correct))]
    if items is not None:
        items += log
    return dict(exact_match=sum(correct) / len(records), exact_match_stderr=harness.mean_stderr(
        [float(c) for c in correct]), n=len(records), samples=log[:n_samples])


# ----------------------------------------------------------------------------- dispatch

def check_task(records, task, path=None):
    """DataError naming the file (or record) and the expected keys if a record is not the kind `task` reads."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}")
    keys = " or ".join("{" + ", ".join(data.KINDS[want]) + "}" for want in TASKS[task])
    for i, rec in enumerate(records):
        where = f"{path}: record {i + 1}" if path else f"record {i + 1}"
        try:
            kind = data.record_kind(rec)
        except ValueError as e:
            raise data.DataError(f"{where}: {e}") from None
        if kind not in TASKS[task]:
            raise data.DataError(f"{where}: task {task!r} reads {keys} records, this one has keys {sorted(rec)}")
        if kind == "mc" and not all(isinstance(c, str) for c in rec["choices"]):
            raise data.DataError(f"{where}: choices must be strings")
        if kind in ("qa", "chat"):
            gold = rec["answer"] if kind == "qa" else [m["content"] for m in rec["messages"]
                                                       if m["role"] == "assistant"][-1]
            if answers.extract_number(gold) is None:
                raise data.DataError(f"{where}: answer {str(gold)[:60]!r} has no number to match")


def evaluate(model, tok, task, records, path=None, **kw):
    """Check the records' kind, then run `task` ("ppl", "mc" or "gen") with the keyword arguments of its function."""
    if not records:
        raise data.DataError(f"{path or 'records'}: nothing to evaluate")
    check_task(records, task, path)
    return {"ppl": perplexity, "mc": multiple_choice, "gen": generation}[task](model, tok, records, **kw)


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # what to evaluate
    hub.add_model_flags(ap)
    ap.add_argument("--adapter", default=None, help="adapter directory written by train.py (adapter_config.json + "
                    "adapter.safetensors); evaluated unmerged on top of --model")
    ap.add_argument("--task", required=True, choices=list(TASKS),
                    help="ppl: perplexity of {text}; mc: accuracy on {query, choices, gold}; "
                    "gen: exact match on {question, answer}")
    ap.add_argument("--data", required=True, help=".jsonl or .jsonl.gz records of the kind the task reads")
    ap.add_argument("--limit", type=int, default=None, help="evaluate the first N records only (None: all)")
    # how
    ap.add_argument("--batch-size", type=int, default=8, help="sequences (mc: query-choice pairs) per forward pass")
    ap.add_argument("--seq-len", type=int, default=None, help="longest sequence: ppl window length; mc and gen cut "
                    "the start of longer prompts (None: 2048, or the model's max_position_embeddings if less)")
    ap.add_argument("--allow-long-seq", action="store_true", help="allow --seq-len above max_position_embeddings")
    ap.add_argument("--num-fewshot", type=int, default=0, help="mc / gen: solved examples before each prompt, "
                    "drawn from --fewshot-data as lm-eval's default sampler")
    ap.add_argument("--fewshot-data", default=None, help="records to draw the few-shot examples from "
                    "(the kind --data has; the same file: a record never shows itself)")
    ap.add_argument("--fewshot-seed", type=int, default=1234, help="seed of the few-shot draws (lm-eval's default)")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="gen: most tokens generated per answer")
    ap.add_argument("--plain", "--reference", action="store_true",
                    help="run moe.py's plain code, not the fast twins (moe_fast.py)")
    # output
    ap.add_argument("--out", default=None, help="also write the results JSON here (atomically)")
    ap.add_argument("--log-samples", default=None, help="write one JSON line per item here: mc its choices' "
                    "log-likelihoods, lengths, picks and correctness; gen the generation and the extracted answer")
    args = ap.parse_args(argv)
    for flag in ("limit", "batch_size", "seq_len", "max_new_tokens"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} {v}: must be at least 1")
    for flag in ("out", "log_samples"):  # before the model is loaded
        path = getattr(args, flag)
        if path is not None and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            ap.error(f"--{flag.replace('_', '-')} {path}: must name a file in an existing directory")
    if args.num_fewshot < 0 or (args.num_fewshot and (args.task == "ppl" or args.fewshot_data is None)):
        ap.error(f"--num-fewshot {args.num_fewshot}: needs --task mc or gen and a --fewshot-data file")
    if os.path.isfile(os.path.join(args.model, "config.json")):  # as train.py: not past the trained positions
        try:
            limit = hub.read_config(args.model).max_position_embeddings
        except ValueError as e:
            ap.error(f"--model: {e}")
        args.seq_len = args.seq_len or min(2048, limit)
        if args.seq_len > limit and not args.allow_long_seq:
            ap.error(f"--seq-len {args.seq_len}: longer than the model's max_position_embeddings ({limit}); "
                     "use a shorter --seq-len, or --allow-long-seq")
    args.seq_len = args.seq_len or 2048  # no config.json: run() names the model directory
    return args


def progress_printer(unit):
    """A progress(done, total) callback printing one line per ~10%: done/total and the rate."""
    t0, next_at = time.time(), [0.1]

    def progress(done, total):
        if done >= next_at[0] * total or done == total:
            print(f"  {done}/{total} {unit}, {done / max(time.time() - t0, 1e-9):,.1f} {unit}/s", flush=True)
            next_at[0] = math.floor(10 * done / total) / 10 + 0.1
    return progress


def run(args):
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise OSError(f"{args.out}: the output directory does not exist")  # fail before the long run
    # ---- data
    records = data.read_jsonl(args.data)
    data.check_records(records, args.data)  # unknown kinds, named by file and line
    records = records[:args.limit]
    check_task(records, args.task, args.data)
    if args.num_fewshot:
        pool = data.read_jsonl(args.fewshot_data)
        check_task(pool, args.task, args.fewshot_data)
        kind = data.record_kind(records[0])
        same = os.path.abspath(args.fewshot_data) == os.path.abspath(args.data)
        records = harness.fewshot(records, pool, args.num_fewshot, args.fewshot_seed, kind, same)
    # ---- model
    if not os.path.isdir(args.model):
        raise OSError(f"{args.model}: model directory not found")
    device = hub.pick_device(args.device)
    dtype = hub.pick_dtype(args.dtype, device)
    model = hub.load_model(args.model, dtype=dtype, device=device)
    model.set_plain(args.plain)
    tok = tokenizer.load(args.model)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"{args.model}: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    if args.adapter is not None:
        methods.load_adapter(model, args.adapter)  # refuses an adapter made for another base
    print(f"eval.py: {args.task} on {len(records)} records of {args.data}; {model.config.model_type}"
          f"{' + adapter ' + args.adapter if args.adapter else ''}, {dtype}, {device}", flush=True)
    # ---- evaluate
    items = [] if args.log_samples else None
    kw = dict(batch_size=args.batch_size, seq_len=args.seq_len, items=items,
              progress=progress_printer({"ppl": "windows", "mc": "pairs", "gen": "records"}[args.task]))
    if args.task == "gen":
        kw["max_new_tokens"] = args.max_new_tokens
    t0 = time.time()
    results = evaluate(model, tok, args.task, records, path=args.data, **kw)
    results = dict(task=args.task, model=args.model, adapter=args.adapter, data=args.data, records=len(records),
                   seq_len=args.seq_len, num_fewshot=args.num_fewshot, dtype=str(dtype).removeprefix("torch."),
                   device=str(device), seconds=round(time.time() - t0, 3), **results)
    # ---- save
    text = json.dumps(results, indent=1)
    print(text)
    if args.out is not None:
        atomic.write_text(args.out, text + "\n")
        print(f"eval.py: wrote the results to {args.out}")
    if args.log_samples is not None:
        harness.write_samples(args.log_samples, items)
        print(f"eval.py: wrote {len(items)} items, one JSON line each, to {args.log_samples}")
    return results


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # DataError, ConfigError, CheckpointError, AdapterError are ValueErrors
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
