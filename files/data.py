"""The JSON-lines data formats shared by train.py, eval.py and router_profile.py, and how a record becomes token
ids, loss masks and padded batches (the tokenizers themselves: tokenizer.py).

Records, one JSON object per line (`.jsonl` or `.jsonl.gz`), told apart by their keys:
    text    {"text"}                          plain text, loss on every token
    prompt  {"prompt", "completion"}          loss on the completion only
    mc      {"query", "choices", "gold"}      multiple choice; train text is query + " " + choices[gold]
    qa      {"question", "answer"}            generation eval (GSM8K); trains like mc: question + " " + answer
    chat    {"messages": [{"role", "content"}]}  rendered with the model's chat template, loss on the assistant
                                              turns (chat.py; needs jinja2)
Extra keys (e.g. "id") are allowed and ignored.

Loss-mask convention: `loss_mask[i] = 1` means token i is a prediction target, i.e. the model predicts
ids[i] from ids[:i]. So loss_mask[0] is always 0 (nothing comes before it), and `pad_batch` turns the
masks into next-token `labels` for `cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)`.
"""

import gzip
import json
import math
import os
import random

import torch

from files import chat

IGNORE = -100  # label value that cross_entropy ignores

class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault."""


# ----------------------------------------------------------------------------------------------------
# JSON-lines records

KINDS = {  # checked in this order; a record's kind is the first whose keys it has
    "chat": ("messages",),
    "mc": ("query", "choices", "gold"),
    "prompt": ("prompt", "completion"),
    "qa": ("question", "answer"),
    "text": ("text",),
}


def read_jsonl(path):
    """All records of a `.jsonl` or `.jsonl.gz` file, blank lines skipped."""
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    try:
        return _read_records(path)
    except (UnicodeDecodeError, OSError, EOFError) as e:  # not UTF-8 text, not gzip, truncated
        raise DataError(f"{path}: cannot read ({e})") from None


def _read_records(path):
    records = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records (empty file)")
    return records


def record_kind(rec):
    """The kind of a record, "chat", "text", "prompt", "mc" or "qa"; ValueError naming its keys if none fits."""
    for kind, keys in KINDS.items():
        if all(k in rec for k in keys):
            if kind == "chat":
                chat.check_messages(rec)  # roles, empty content, no assistant turn
            for k in set(keys) & {"text", "prompt", "completion", "query", "question"}:
                if not isinstance(rec[k], str):
                    raise ValueError(f"{kind} record: {k!r} must be a string, not {type(rec[k]).__name__}")
            if kind == "mc" and not (isinstance(rec["choices"], list) and all(isinstance(c, str) for c in rec["choices"])):
                raise ValueError(f"mc record: 'choices' must be a list of strings, not {rec['choices']!r}")
            if kind == "mc":  # a bad gold would silently train on (or score) the wrong answer
                gold, n = rec["gold"], len(rec["choices"])
                if not (isinstance(gold, int) and 0 <= gold < n):
                    raise ValueError(f"mc record: gold={gold!r} is not an index into its {n} choices")
            return kind
    expected = " or ".join("{" + ", ".join(keys) + "}" for keys in KINDS.values())
    raise ValueError(f"record with keys {sorted(rec)}: expected {expected}")


def check_records(records, path=None):
    """Raise DataError naming the file and line of the first record whose kind is unknown."""
    for i, rec in enumerate(records):
        try:
            record_kind(rec)
        except ValueError as e:
            where = f"{path}:{_line_number(path, i)}" if path else f"record {i + 1}"
            raise DataError(f"{where}: {e}") from None


def _line_number(path, index):
    # read_jsonl skips blank lines, so re-read the file to turn a record index into a line number
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = [n for n, line in enumerate(f, 1) if line.strip()]
    return lines[index]


# ----------------------------------------------------------------------------------------------------
# encoding, padding, packing, batching


def prompt_and_answer(rec):
    """(prompt, answer) of a prompt, mc or qa record, as they are trained and routed: prompt + completion;
    query + " " + the gold choice; question + " " + answer. The one place a record's kind becomes text."""
    kind = record_kind(rec)
    if kind == "prompt":
        return rec["prompt"], rec["completion"]
    if kind == "mc":
        return rec["query"], " " + rec["choices"][rec["gold"]]
    if kind == "qa":
        return rec["question"], " " + str(rec["answer"])
    raise ValueError(f"a {kind} record has no prompt and answer")


def record_text(rec, tok=None):
    """The whole text of a record, without EOS: a text record's text, the prompt and answer joined, or a chat
    record's conversation as tok's chat template writes it."""
    kind = record_kind(rec)
    if kind == "chat":
        return chat.render(tok, rec["messages"])
    return rec["text"] if kind == "text" else "".join(prompt_and_answer(rec))


def encode_pair(tok, prompt, completion):
    """(prompt_ids, completion_ids) whose concatenation is exactly encode(prompt + completion).

    Encoding the completion on its own would be wrong with sentencepiece, which puts a dummy "▁" in front
    of every text (" Paris" alone becomes "▁▁Paris", not the "▁Paris" the model sees after "Answer:").
    So we encode the whole text and the prompt, and split at their common prefix (as lm-eval-harness
    does). BOS is only at the start. A token straddling the boundary counts as completion.
    """
    full, head = tok.encode(prompt + completion), tok.encode(prompt)
    n = 0
    while n < min(len(full), len(head)) and full[n] == head[n]:
        n += 1
    return full[:n], full[n:]


def encode_example(tok, rec, max_len, loss_on="answer", eos=True):
    """(ids, loss_mask) of one record, EOS appended (unless `eos` is False), at most max_len tokens.

    text: loss on every token but the first; truncated from the right (the EOS may be cut).
    prompt / mc / qa with loss_on="answer": loss on the answer tokens and the EOS only. Too long: the prompt is
    cut from the left (keeping BOS) so the answer survives; an answer longer than max_len is itself cut from the
    right. loss_on="all": the formatted text (prompt + answer + EOS) trains like a text record (MoE-Sieve's
    trainer computes the loss on every token of its formatted examples). eos=False: no EOS after a text or an
    answer (MoE-Sieve's trainer tokenises the formatted text alone); a chat record ends as its template ends it.
    """
    ids, mask, _ = _encode(tok, rec, max_len, loss_on, eos)
    return ids, mask


def encode_examples(tok, records, max_len, loss_on="answer", path=None, eos=True):
    """[(ids, loss_mask)] of every record, and (records cut, tokens cut) by max_len, for one report. A chat record
    the template refuses is a DataError naming `path` and its line."""
    out, n_cut, tokens_cut = [], 0, 0
    for i, rec in enumerate(records):
        try:
            ids, mask, cut = _encode(tok, rec, max_len, loss_on, eos)
        except chat.ChatError as e:
            raise DataError(f"{path}:{_line_number(path, i)}: {e}" if path else f"record {i + 1}: {e}") from None
        out.append((ids, mask))
        n_cut, tokens_cut = n_cut + (cut > 0), tokens_cut + cut
    return out, (n_cut, tokens_cut)


def _encode(tok, rec, max_len, loss_on, eos=True):  # (ids, loss_mask, number of tokens cut)
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', not {loss_on!r}")
    kind = record_kind(rec)
    if kind == "chat":
        return chat.encode(tok, rec, max_len, loss_on)
    if kind == "text":
        ids = tok.encode(rec["text"]) + [tok.eos_id] * eos
        return ids[:max_len], [0] + [1] * (min(len(ids), max_len) - 1), max(0, len(ids) - max_len)
    head, tail = encode_pair(tok, *prompt_and_answer(rec))
    tail = tail + [tok.eos_id] * eos
    n = len(head) + len(tail)
    if loss_on == "all":
        ids = (head + tail)[:max_len]
        return ids, [0] + [1] * (len(ids) - 1), max(0, n - max_len)
    bos = head[:1] if head[:1] == [tok.bos_id] else []
    if n > max_len:
        tail = tail[: max_len - len(bos)]
        keep = max_len - len(bos) - len(tail)  # prompt tokens (after BOS) that still fit
        head = bos + (head[len(bos) :][-keep:] if keep > 0 else [])
    mask = [0] * len(head) + [1] * len(tail)
    mask[0] = 0  # nothing precedes the first token (an empty prompt without BOS)
    return head + tail, mask, n - len(head) - len(tail)


def pad_batch(seqs, masks, pad_id, side="right"):
    """(input_ids, attention_mask, labels), each a LongTensor [B, T], T the longest sequence.

    labels[b, t] is the target of position t: the next token ids[t+1] if loss_mask[t+1] else -100;
    padding gets -100 and attention_mask 0. side="left" puts the padding first (for generation).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', not {side!r}")
    B, T = len(seqs), max(len(s) for s in seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    for b, (ids, mask) in enumerate(zip(seqs, masks)):
        n = len(ids)
        if n == 0 or len(mask) != n:
            raise ValueError(f"sequence {b}: {n} ids and {len(mask)} mask entries (need as many, at least one)")
        o = 0 if side == "right" else T - n  # offset of the first real token
        input_ids[b, o : o + n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, o : o + n] = 1
        nxt = torch.tensor(ids[1:], dtype=torch.long)
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        labels[b, o : o + n - 1] = torch.where(keep, nxt, IGNORE)
    return input_ids, attention_mask, labels


def pack_examples(examples, seq_len):
    """Concatenate (ids, loss_mask) examples and cut the stream into rows of seq_len tokens.

    Greedy and simple: an example may be split across two rows, and the last row may be shorter.
    The first token of every row gets mask 0 (nothing precedes it in that row). Attention crosses
    example boundaries inside a row (one causal mask per row): when that matters, pad single examples
    with pad_batch instead of packing (the choice is a train.py flag).
    """
    stream_ids, stream_mask = [], []
    for ids, mask in examples:
        stream_ids += ids
        stream_mask += mask
    rows = []
    for i in range(0, len(stream_ids), seq_len):
        ids, mask = stream_ids[i : i + seq_len], stream_mask[i : i + seq_len]
        rows.append((ids, [0] + mask[1:]))
    return rows


def batches(examples, batch_size, seed, shuffle=True):
    """Yield lists of batch_size examples (the last may be smaller), shuffled by random.Random(seed)."""
    order = list(range(len(examples)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield [examples[j] for j in order[i : i + batch_size]]


def step_schedule(n_examples, batch_size, grad_accum, steps=None, epochs=1.0, seed=0, world=1):
    """Micro-batches of every optimizer step, as lists of example indices: `steps` steps (None: enough for
    `epochs` passes) of grad_accum micro-batches, epochs reshuffled with seed + epoch. Under torchrun an epoch's
    last micro-batch is dropped if it has fewer sequences than processes (a process without a share would fail
    while the others wait for it in the gradient's all-reduce)."""
    if n_examples < world:
        raise ValueError(f"--data: {n_examples} sequences, fewer than the {world} processes")
    steps = steps or max(1, math.ceil(epochs * n_examples / (batch_size * grad_accum)))
    micro, epoch = [], 0
    while len(micro) < steps * grad_accum:
        micro += [mb for mb in batches(list(range(n_examples)), batch_size, seed + epoch) if len(mb) >= world]
        epoch += 1
    return [micro[s * grad_accum:(s + 1) * grad_accum] for s in range(steps)]


def step_batches(examples, step_micro, pad_id, rank=0, world=1):
    """One step's padded micro-batches for this rank, and the step's number of target tokens over all ranks
    (the step's loss is a mean over these, so every micro-batch and rank divides by the same count)."""
    micro = [[examples[i] for i in mb] for mb in step_micro]
    n_targets = sum(sum(m[1:]) for mb in micro for _, m in mb)
    micro = [mb[rank::world] for mb in micro]  # torchrun: this rank's share of each global micro-batch
    return [pad_batch([e[0] for e in mb], [e[1] for e in mb], pad_id) for mb in micro], n_targets


def to_device(t, device):
    """A batch tensor onto the device; on CUDA through pinned memory, so the copy does not block the host."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
