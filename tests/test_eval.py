"""eval.py: number extraction, the three metrics on fake models whose log-probabilities are known exactly,
adapter == merged checkpoint through the CLI, generation end to end on a tiny checkpoint, and CLI errors."""
import json
import math
import random
import types

import pytest
import torch

from evaluation import answers, harness
from files import data
import eval as ev
from files import export
from files import hub
from conftest import FORWARD, tol
from tiny import tiny_checkpoint, tiny_model
import methods
from files import tokenizer

# ----------------------------------------------------------------------------- fakes


class CharTokenizer:
    """One token per printable ASCII character (id = ord - 29), BOS 1 prepended, EOS 2, pad 0; vocabulary 128.
    decode shows the special tokens ("<2>"), so an output not cut at EOS would show."""
    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 128

    def encode(self, text, bos=None):
        return [self.bos_id] + [ord(c) - 29 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 29) if i >= 3 else f"<{i}>" for i in ids)


TOK = CharTokenizer()


def uniform_model(ids, mask):
    """Every token has probability 1/128 everywhere."""
    return torch.zeros(*ids.shape, TOK.vocab_size)


class Emitter(torch.nn.Module):
    """A fake model for generate.generate: after a prompt it emits the tokens scripted for that prompt, then EOS."""

    def __init__(self, script):  # {prompt text: text to emit}
        super().__init__()
        self.config = types.SimpleNamespace(num_hidden_layers=1, num_key_value_heads=1, head_dim=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # generate reads the device and dtype from a parameter
        self.script = {tuple(TOK.encode(q)): TOK.encode(a)[1:] + [TOK.eos_id] for q, a in script.items()}

    def forward(self, ids, mask, pos=None, cache=None):
        if mask.shape[1] == ids.shape[1]:  # prefill: look up each row's real (unpadded) prompt
            self.todo = [list(self.script[tuple(row[m == 1].tolist())]) for row, m in zip(ids, mask)]
        logits = torch.zeros(ids.shape[0], ids.shape[1], TOK.vocab_size)
        for b, todo in enumerate(self.todo):
            logits[b, -1, todo.pop(0) if todo else ord("9") - 29] = 1.0  # after its EOS a row would say 9s
        return logits


# ----------------------------------------------------------------------------- number extraction


@pytest.mark.parametrize("text,number", [
    ("#### 42", "42"), ("so the answer is 1,234.", "1234"), ("-3.50", "-3.5"), ("no number here", None),
    ("3 apples and 5 pears make 8", "8"), ("12 then #### 7 and later 9", "7"), ("$1,000,000.00", "1000000"),
    (72, "72"), (3.5, "3.5")])
def test_extract_number(text, number):
    """The final number: after the last "####" if any, else the last one; commas, trailing zeros, final "." dropped."""
    assert answers.extract_number(text) == number


def test_exact_match_scores_outputs_against_gold():
    """An output matches when its final number equals the gold's, whatever the formatting; no number never matches."""
    outputs = ["so #### 1,234", "x is 3.50.", "I do not know", "2 + 2 = 5"]
    assert answers.exact_match(outputs, [1234, "work... #### 3.5", "7", "4"]) == [True, True, False, False]


# ----------------------------------------------------------------------------- fake-model metrics


def test_mc_fake_model_preferring_gold_scores_one():
    """A model that strongly prefers the characters of each gold choice gets acc = acc_norm = 1."""
    recs = [{"query": "Pick:", "choices": ["xyz", "abc"], "gold": 1},
            {"query": "Again, pick one:", "choices": ["cab", "zzz", "yx"], "gold": 0},
            {"query": "Q", "choices": ["zz", "yyy", "ba"], "gold": 2}]
    liked = torch.tensor([ord(c) - 29 for c in "abc"])

    def model(ids, mask):
        logits = torch.zeros(*ids.shape, TOK.vocab_size)
        logits[..., liked] = 10.0
        return logits
    res = ev.multiple_choice(model, TOK, recs, batch_size=3)
    assert (res["acc"], res["acc_norm"], res["n"]) == (1.0, 1.0, 3)


def test_mc_acc_norm_divides_by_the_choice_length_without_the_space():
    """Uniform model, choices "ab" and "abcdefgh": the sum prefers the short one (-3 vs -9 log V, the space
    is a token) and the per-character score the long one (-3/2 vs -9/8 log V), so acc 0 and acc_norm 1.
    Dividing by len(" " + choice) would tie at -log V and give acc_norm 0."""
    recs = [{"query": "Q:", "choices": ["ab", "abcdefgh"], "gold": 1}]
    lls = ev.choice_logliks(uniform_model, TOK, recs, batch_size=2)
    rel = tol(torch.float32, 1, 16)  # sums of <= 9 equal log-probabilities, each one rounding of log 1/128
    assert lls[0] == pytest.approx([-3 * math.log(128), -9 * math.log(128)], rel=rel)
    res = ev.multiple_choice(uniform_model, TOK, recs, batch_size=2)
    assert res == dict(acc=0.0, acc_norm=1.0, gold_nll=pytest.approx(9 * math.log(128) / 8, rel=rel), n=1,
                       acc_stderr=None, acc_norm_stderr=None)  # one item: no standard error


def test_perplexity_of_uniform_model_is_vocab_size():
    """A uniform model over V tokens has perplexity exactly V."""
    recs = [{"text": "hello world"}, {"text": "a"}, {"text": "The quick brown fox."}]
    r = ev.perplexity(uniform_model, TOK, recs, batch_size=2, seq_len=64)
    # the NLL: a mean of equal terms, each one rounding of log 128 (32 u for the mean's sum); ppl = exp(NLL)
    # turns the NLL's absolute error (32 u x log 128) into its relative error
    nll_err = tol(torch.float32, math.log(128), 32)
    assert r["nll"] == pytest.approx(math.log(128), abs=nll_err) and r["ppl"] == pytest.approx(128, rel=2 * nll_err)


@pytest.mark.parametrize("seq_len", [2, 5, 64])
def test_perplexity_predicts_every_token_after_the_first_once(seq_len):
    """Every token after the first of each text (EOS included) is predicted exactly once, however it is windowed."""
    recs = [{"text": "hello world"}, {"text": "a"}, {"text": "The quick brown fox."}]
    r = ev.perplexity(uniform_model, TOK, recs, batch_size=3, seq_len=seq_len)
    assert r["tokens"] == sum(len(rec["text"]) + 1 for rec in recs)  # BOS + chars + EOS, less the first


def test_generation_fake_model_emitting_the_answers_scores_one():
    """A model that answers each question with its gold number then EOS scores exact match 1, whatever the
    batching (prompts of different lengths, left-padded, sorted and put back in order)."""
    recs = [{"question": "Q: 2+2?", "answer": 4}, {"question": "Q: how many in total, with all of them?",
                                                   "answer": "3 + 4 = 7 #### 1,234"},
            {"question": "Q: owed?", "answer": "-3.5"}]
    model = Emitter({"Q: 2+2?": " It is 4.", recs[1]["question"]: " 1000 + 234 = 1234", "Q: owed?": " -3.50"})
    r = ev.generation(model, TOK, recs, batch_size=2, max_new_tokens=30)
    assert r["exact_match"] == 1.0 and r["n"] == 3
    assert [s["output"] for s in r["samples"]] == [" It is 4.", " 1000 + 234 = 1234", " -3.50"]  # cut at EOS


def test_evaluate_refuses_records_of_another_kind():
    """evaluate checks the record kind against the task and names the keys it expected."""
    with pytest.raises(data.DataError, match=r"\{question, answer\}"):
        ev.evaluate(uniform_model, TOK, "gen", [{"text": "hi"}])


# ----------------------------------------------------------------------------- tiny checkpoints


MC = [{"query": "Question: What colour is the sky?\nAnswer:", "choices": ["blue", "red", "green"], "gold": 0},
      {"query": "Question: How many legs does a spider have?\nAnswer:", "choices": ["eight", "six"], "gold": 0},
      {"query": "The quick brown fox jumps over the", "choices": ["lazy dog.", "moon", "sea shore"], "gold": 0}]
TEXT = [{"text": "The rain in Spain stays mainly in the plain."}, {"text": "She sells sea shells."},
        {"text": "A journey of a thousand miles begins with one step."}]
QA = [{"question": "Question: What is 2 + 2?\nAnswer:", "answer": "4"},
      {"question": "Question: Numbers like 12 and 345?\nAnswer:", "answer": "#### 357"}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    ckpt = tiny_checkpoint(d / "model")
    out = {"ckpt": ckpt}
    for name, recs in (("mc", MC), ("text", TEXT), ("qa", QA)):
        out[name] = str(d / f"{name}.jsonl")
        with open(out[name], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))
    model = hub.load_model(ckpt)  # an adapter with non-zero B, saved, and the same folded into a checkpoint
    config = methods.attach(model, "lora", r=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in methods.adapter_state(model).items():
            if n.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    methods.save_adapter(model, str(d / "adapter"), config)
    export.export_merged(model, ckpt, str(d / "merged"))
    out.update(adapter=str(d / "adapter"), merged=str(d / "merged"), dir=d)
    return out


def cli(*argv):
    return ev.run(ev.parse_args([str(a) for a in argv] + ["--device", "cpu"]))


def test_adapter_equals_merged_checkpoint(files):
    """Evaluating base + --adapter gives the numbers of the exported merged checkpoint (and not the base's)."""
    f = files
    # an NLL moves by at most twice its logits' error (FORWARD u of the largest logit, see conftest), and the
    # per-token NLL of this random model is ~log V > 1: a relative tolerance of 2 FORWARD u x max |logit| for
    # log-likelihoods, and for ppl = exp(mean NLL) too
    rel = tol(torch.float32, hub.load_model(f["merged"])(torch.randint(3, 300, (2, 16))).abs().max(), 2 * FORWARD)
    ppl = {k: cli("--model", m, *a, "--task", "ppl", "--data", f["text"], "--batch-size", 2)["ppl"]
           for k, m, a in (("adapter", f["ckpt"], ("--adapter", f["adapter"])), ("merged", f["merged"], ()),
                           ("base", f["ckpt"], ()))}
    assert ppl["adapter"] == pytest.approx(ppl["merged"], rel=rel)
    assert abs(ppl["adapter"] / ppl["base"] - 1) > 1e-3  # the adapter does change the model
    mc = [cli("--model", m, *a, "--task", "mc", "--data", f["mc"]) for m, a in
          ((f["ckpt"], ("--adapter", f["adapter"])), (f["merged"], ()))]
    assert (mc[0]["acc"], mc[0]["acc_norm"], mc[0]["n"]) == (mc[1]["acc"], mc[1]["acc_norm"], 3)
    tok = tokenizer.load(f["ckpt"])
    lls = [ev.choice_logliks(hub.load_model(f["merged"]), tok, MC)]
    model = hub.load_model(f["ckpt"])
    methods.load_adapter(model, f["adapter"])
    lls.append(ev.choice_logliks(model, tok, MC))
    for a, b in zip(*lls):
        assert a == pytest.approx(b, rel=rel)


def test_batch_size_does_not_change_the_numbers(files):
    """Right padding is invisible: perplexity and choice log-likelihoods are the same at batch size 1 and 4."""
    model, tok = hub.load_model(files["ckpt"]), tokenizer.load(files["ckpt"])
    p1, p4 = (ev.perplexity(model, tok, TEXT, batch_size=b, seq_len=8) for b in (1, 4))
    rel = tol(torch.float32, model(torch.randint(3, 300, (2, 16))).abs().max(), 2 * FORWARD)  # as above
    assert p1["tokens"] == p4["tokens"] and p1["nll"] == pytest.approx(p4["nll"], rel=rel)
    for a, b in zip(ev.choice_logliks(model, tok, MC, batch_size=1), ev.choice_logliks(model, tok, MC, batch_size=4)):
        assert a == pytest.approx(b, rel=rel)


def test_cli_generation_end_to_end(files, capsys):
    """gen on a tiny checkpoint: an answer for each record, exact match in [0, 1], the file holds the printed JSON."""
    out = files["dir"] / "gen.json"
    r = cli("--model", files["ckpt"], "--task", "gen", "--data", files["qa"], "--max-new-tokens", 6,
            "--batch-size", 2, "--out", out)
    assert 0.0 <= r["exact_match"] <= 1.0 and r["n"] == 2 and json.loads(out.read_text()) == r
    assert [s["gold"] for s in r["samples"]] == ["4", "357"] and all(isinstance(s["output"], str) for s in r["samples"])
    stdout = capsys.readouterr().out
    assert "2/2 records" in stdout and '"exact_match"' in stdout


def test_generation_matches_moe_generate_row_by_row(files):
    """Batched left-padded generation gives each record the answer it gets alone (greedy, cut at EOS)."""
    model, tok = hub.load_model(files["ckpt"]), tokenizer.load(files["ckpt"])
    together = ev.generation(model, tok, QA, batch_size=2, max_new_tokens=5)["samples"]
    alone = [ev.generation(model, tok, [q], batch_size=1, max_new_tokens=5)["samples"][0] for q in QA]
    assert [s["output"] for s in together] == [s["output"] for s in alone]


@pytest.mark.parametrize("broken", ["no_data", "wrong_kind", "no_model", "other_base"])
def test_cli_errors_exit_1_name_the_file_and_write_nothing(files, tmp_path, capsys, broken):
    """A missing data file or model, mc on text records, or an adapter for another base: exit 1, a message
    naming the file (and the expected keys), and no --out file."""
    other = tmp_path / "other_adapter"  # an adapter made for the tiny Mixtral: another base
    m = tiny_model("mixtral")
    methods.save_adapter(m, str(other), methods.attach(m, "attn", r=2, alpha=4))
    args, expect = {
        "no_data": (["--task", "ppl", "--data", tmp_path / "nope.jsonl"], ["nope.jsonl", "no such file"]),
        "wrong_kind": (["--task", "mc", "--data", files["text"]], ["text.jsonl", "{query, choices, gold}"]),
        "no_model": (["--task", "ppl", "--data", files["text"], "--model", tmp_path / "none"], ["none", "not found"]),
        "other_base": (["--task", "ppl", "--data", files["text"], "--adapter", other], ["other_adapter", "mixtral"]),
    }[broken]
    out = tmp_path / "r.json"
    argv = ["--model", files["ckpt"]] + args + ["--out", out, "--device", "cpu"]
    assert ev.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("eval.py: error: ") and all(s in err for s in expect), err
    assert not out.exists() and not list(tmp_path.glob("r.json*"))


def test_out_that_is_a_directory_is_refused_before_loading(files, tmp_path, capsys):
    """--out naming a directory: exit 2 at once, the flag named (the model is not loaded, nothing is written)."""
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(tmp_path / "never_read"), "--task", "ppl", "--data", str(files["text"]),
                 "--out", str(tmp_path)])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err


# ----------------------------------------------------------------------------- no autograd, per-item log, few-shot


def test_evaluation_runs_without_autograd_when_the_base_requires_grad(files):
    """train.py evaluates a model whose parameters require gradients: every scoring function switches autograd off
    itself (every module forward inside runs with gradients disabled), returns nothing that keeps a graph, and
    gives the caller's mode back."""
    from conftest import NoGradWatch, assert_no_graph
    model, tok = hub.load_model(files["ckpt"]), tokenizer.load(files["ckpt"])
    model.requires_grad_(True)
    for run in (lambda: ev.perplexity(model, tok, TEXT, seq_len=8, items=[]),
                lambda: ev.choice_logliks(model, tok, MC),
                lambda: ev.multiple_choice(model, tok, MC, items=[]),
                lambda: ev.generation(model, tok, QA, max_new_tokens=3, seq_len=64, items=[])):
        with NoGradWatch(model) as watch:
            out = run()
        watch.check()
        assert_no_graph(out)
        assert torch.is_grad_enabled()


def test_seq_len_beyond_the_trained_positions_is_refused(files, capsys):
    """As train.py: --seq-len above max_position_embeddings (128 here) exits 2 naming both, before the model is
    read; the default is min(2048, max_position_embeddings); --allow-long-seq lets it through."""
    argv = ["--model", files["ckpt"], "--task", "ppl", "--data", files["text"]]
    with pytest.raises(SystemExit) as e:
        ev.parse_args(argv + ["--seq-len", "129"])
    assert e.value.code == 2 and "max_position_embeddings (128)" in capsys.readouterr().err
    assert ev.parse_args(argv).seq_len == 128
    assert ev.parse_args(argv + ["--seq-len", "129", "--allow-long-seq"]).seq_len == 129


def test_log_samples_and_standard_errors(files, tmp_path):
    """--log-samples: one JSON line per item, whose numbers make the printed results: mc its choices'
    log-likelihoods (those of choice_logliks), lengths, picks and correctness; acc's standard error is lm-eval's
    sqrt(p (1 - p) / (n - 1)); ppl's per-text NLL sums and token counts; gen the output and extracted answer."""
    log = tmp_path / "mc.jsonl"
    r = cli("--model", files["ckpt"], "--task", "mc", "--data", files["mc"], "--log-samples", log)
    items = [json.loads(line) for line in log.read_text().splitlines()]
    assert [i["index"] for i in items] == [0, 1, 2] and [i["chars"] for i in items] == [[4, 3, 5], [5, 3], [9, 4, 9]]
    lls = ev.choice_logliks(hub.load_model(files["ckpt"]), tokenizer.load(files["ckpt"]), MC)
    assert [i["loglik"] for i in items] == [pytest.approx(x, rel=1e-6) for x in lls]
    for i in items:
        assert i["pick"] == max(range(len(i["loglik"])), key=i["loglik"].__getitem__) and i["acc"] == (i["pick"] == 0)
    p = sum(i["acc"] for i in items) / 3
    assert r["acc"] == p and r["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 2))
    assert r["acc_norm"] == sum(i["acc_norm"] for i in items) / 3
    r = cli("--model", files["ckpt"], "--task", "ppl", "--data", files["text"], "--seq-len", 8, "--log-samples", log)
    items = [json.loads(line) for line in log.read_text().splitlines()]
    assert sum(i["tokens"] for i in items) == r["tokens"]
    assert sum(i["nll"] for i in items) / r["tokens"] == pytest.approx(r["nll"], rel=1e-12)
    r = cli("--model", files["ckpt"], "--task", "gen", "--data", files["qa"], "--max-new-tokens", 4,
            "--log-samples", log)
    items = [json.loads(line) for line in log.read_text().splitlines()]
    assert [i["gold"] for i in items] == ["4", "357"]
    assert all(i["pred"] == answers.extract_number(i["output"]) for i in items)


def test_mean_stderr_is_lm_evals():
    """lm-eval's mean_stderr: the sample standard deviation over sqrt(n)."""
    xs = [1.0, 0.0, 1.0, 1.0, 0.0]
    mu = sum(xs) / 5
    assert harness.mean_stderr(xs) == pytest.approx(math.sqrt(sum((x - mu) ** 2 for x in xs) / 4 / 5))
    assert harness.mean_stderr([1.0]) is None


def test_fewshot_draws_as_lm_evals_default_sampler():
    """One random.Random(seed) drawn in record order, rnd.sample(pool, k) per record (k + 1 from the evaluated file
    itself, the record dropped); examples "query gold" joined by blank lines before the record's query."""
    pool = [{"query": f"Q{i}:", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(8)]
    shots = harness.fewshot(MC, pool, 2, seed=7)
    rnd = random.Random(7)
    for rec, got in zip(MC, shots):
        ex = rnd.sample(pool, 2)
        want = "\n\n".join(e["query"] + " " + e["choices"][e["gold"]] for e in ex) + "\n\n" + rec["query"]
        assert got == {**rec, "query": want}
    same = harness.fewshot(pool, pool, 7, seed=1, same_file=True)
    assert all(rec["query"] not in got["query"].rsplit("\n\n", 1)[0] for rec, got in zip(pool, same))
    assert all(got["query"].count("\n\n") == 7 for got in same)
    with pytest.raises(ValueError, match="fewer than the 9"):
        harness.fewshot(pool, pool, 8, same_file=True)


def test_cli_fewshot_scores_the_context(files, tmp_path):
    """--num-fewshot K --fewshot-data F: the records scored are the few-shot ones, the same seed the same."""
    args = ("--model", files["ckpt"], "--task", "mc", "--data", files["mc"], "--num-fewshot", 2, "--fewshot-data",
            files["mc"])
    a, b = cli(*args, "--log-samples", tmp_path / "a.jsonl"), cli(*args, "--log-samples", tmp_path / "b.jsonl")
    assert a["num_fewshot"] == 2 and (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    zero = cli("--model", files["ckpt"], "--task", "mc", "--data", files["mc"], "--log-samples", tmp_path / "z.jsonl")
    assert (tmp_path / "a.jsonl").read_text() != (tmp_path / "z.jsonl").read_text()
    tok, model = tokenizer.load(files["ckpt"]), hub.load_model(files["ckpt"])
    want = ev.choice_logliks(model, tok, harness.fewshot(MC, MC, 2, 1234, "mc", same_file=True))
    got = [json.loads(line)["loglik"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert got == [pytest.approx(x, rel=1e-6) for x in want]
