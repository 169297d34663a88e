"""router_profile.py: counts and mass against a brute force over transformers' router logits, the statistics
on hand-made count matrices, the JSON file, and the CLI end to end on a tiny checkpoint + sentencepiece model."""

import io
import json
import math
import random
import sys

import pytest
import torch
from conftest import FORWARD, assert_decisive, assert_within, hf_topk, make_ids

from files import data
from files import hub
from files import plots
import router_profile as rp
from files import tokenizer

MOE_LAYERS = {"olmoe": [0, 1], "qwen2_moe": [0, 2]}  # qwen2_moe: layer 1 is dense (mlp_only_layers)


def padded(lengths, side, seed=0):
    """A batch of random ids of the given lengths, padded with 0 on `side`, and its attention mask."""
    T = max(lengths)
    ids, mask = torch.zeros(len(lengths), T, dtype=torch.long), torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        s = slice(0, n) if side == "right" else slice(T - n, T)
        ids[b, s], mask[b, s] = make_ids(1, n, seed=seed + b)[0], 1
    return ids, mask


@pytest.mark.parametrize("name", ["olmoe", "qwen2_moe"])
@torch.no_grad()
def test_counts_and_mass_match_hf(checkpoints, name):
    """Counts (and mass) equal a brute force over transformers' router logits of the real tokens only,
    under the real layer indices (Qwen's dense layer 1 is skipped, not renumbered)."""
    ck = checkpoints(name)
    ids, mask = padded([12, 7, 3], "right")
    p = rp.profile(hub.load_model(ck.path), [(ids, mask), (ids[:1, :5], None)])  # second batch: no mask
    hf = [ck.hf(ids, attention_mask=mask, output_router_logits=True).router_logits,
          ck.hf(ids[:1, :5], output_router_logits=True).router_logits]
    cfg, E = ck.hf.config, ck.hf.config.num_experts
    real = [mask.reshape(-1).bool(), torch.ones(5, dtype=torch.bool)]
    assert p["layers"] == MOE_LAYERS[name] and p["tokens"] == 12 + 7 + 3 + 5 and p["samples"] == 4
    for i in range(len(p["layers"])):
        counts, mass = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.float64)
        for logits, keep in zip((hf[0][i], hf[1][i]), real):
            assert_decisive(logits[keep], cfg.num_experts_per_tok, FORWARD)  # so the counts compare exactly
            w, idx = hf_topk(logits[keep], cfg.num_experts_per_tok)  # (n, K)
            if cfg.norm_topk_prob:
                w = w / w.sum(-1, keepdim=True)
            counts += torch.bincount(idx.reshape(-1), minlength=E)
            mass.index_add_(0, idx.reshape(-1), w.reshape(-1).double())
        assert p["counts"][i] == counts.tolist()
        # per expert, a float64 sum of <= 27 top-k weights (<= 1) that each side takes from router logits within
        # FORWARD of each other (see conftest): the weights' error is at most the logits' (test_parity), 27 times
        assert_within(torch.tensor(p["mass"][i], dtype=torch.float64), mass, 27 * FORWARD * hf[0][i].abs().max(),
                      magnitude=1)
        assert sum(p["counts"][i]) == p["tokens"] * cfg.num_experts_per_tok


@torch.no_grad()
def test_padding_side_does_not_matter(checkpoints):
    """Left padding gives the same profile as right padding: positions follow the attention mask."""
    model = hub.load_model(checkpoints("olmoe").path)
    right = rp.profile(model, [padded([9, 4, 6], "right")])
    left = rp.profile(model, [padded([9, 4, 6], "left")])
    ids, mask = padded([9, 4, 6], "right")
    _, routing = model(ids, attention_mask=mask, return_routing=True)
    for r in routing:  # the same tokens at other places in the batch: their router logits differ by rounding only
        assert_decisive(r.logits[mask.reshape(-1).bool()], model.config.num_experts_per_tok, FORWARD)
    assert left["counts"] == right["counts"] and left["tokens"] == right["tokens"] == 19
    # other blockings of the same sums: each of the 19 weights summed per expert within the router logits' error
    # (FORWARD u of the largest, see conftest), as in test_counts_and_mass_match_hf
    scale = max(r.logits.abs().max().item() for r in routing)
    assert_within(torch.tensor(left["mass"]), torch.tensor(right["mass"]), 19 * FORWARD * scale, magnitude=1)


def counts_profile(rows):
    return {"layers": list(range(len(rows))), "counts": rows}


def test_stats_uniform():
    """Uniform counts: CV 0, no cold experts, coverage of the top 25% = 0.25, normalised entropy 1."""
    s = rp.stats(counts_profile([[5] * 8, [7] * 8]))
    for x in s["per_layer"] + [s["mean"]]:
        assert x["cv"] == pytest.approx(0) and x["cold"] == 0
        assert x["cov25"] == pytest.approx(0.25) and x["entropy"] == pytest.approx(1)


def test_stats_one_hot_and_cold_boundary():
    """One-hot counts over E=8: CV sqrt(E - 1) (population std, MoE-Sieve's Table 2), sqrt(E) with the sample std
    (its notebook), 7/8 cold, coverage 1, entropy 0;
    a count equal to the threshold (0.5 * total / E, MoE-Sieve's cold rule) is not cold, one below it is."""
    (hot,) = rp.stats(counts_profile([[0, 0, 0, 80, 0, 0, 0, 0]]))["per_layer"]
    s = rp.stats(counts_profile([[25, 5, 5, 5], [26, 5, 5, 4]]))
    at, below = s["per_layer"]
    assert hot["cv"] == pytest.approx(math.sqrt(7)) and hot["cv_sample"] == pytest.approx(math.sqrt(8))
    assert hot["cold"] == 7 / 8
    assert hot["cov25"] == 1 and hot["entropy"] == pytest.approx(0, abs=1e-12)
    assert at["cold"] == 0 and below["cold"] == 0.25  # threshold 0.5 * 40 / 4 = 5
    assert at["cov25"] == pytest.approx(25 / 40)  # floor(0.25 * 4) = 1 expert
    assert at["cv"] == pytest.approx(math.sqrt(((25 - 10) ** 2 + 3 * 25) / 4) / 10)
    assert at["cv_sample"] == pytest.approx(math.sqrt(((25 - 10) ** 2 + 3 * 25) / 3) / 10)
    assert s["mean"]["cold"] == pytest.approx((0 + 0.25) / 2)


def test_save_load_roundtrip(tmp_path):
    """save_profile then load_profile gives back the same dict, and leaves no temporary file behind."""
    p = {"model_type": "olmoe", "num_experts": 4, "top_k": 2, "layers": [0, 3], "counts": [[1, 2, 3, 4], [4, 3, 2, 1]],
         "mass": [[0.5, 1.0, 1.5, 2.0], [2.0, 1.5, 1.0, 0.5]], "tokens": 5, "samples": 2, "cold_threshold": 0.5}
    p["stats"] = rp.stats(p)
    rp.save_profile(p, tmp_path / "p.json")
    assert rp.load_profile(tmp_path / "p.json") == p
    assert [f.name for f in tmp_path.iterdir()] == ["p.json"]


def test_load_errors_name_the_file(tmp_path):
    """A missing, malformed or mis-shaped profile raises ValueError naming the file."""
    bad = tmp_path / "bad.json"
    with pytest.raises(ValueError, match="missing.json"):
        rp.load_profile(tmp_path / "missing.json")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        rp.load_profile(bad)
    bad.write_text(json.dumps({"model_type": "olmoe", "num_experts": 4, "top_k": 2, "layers": [0, 1],
                               "counts": [[1, 2, 3, 4]], "mass": [[1, 1, 1, 1]], "tokens": 5}))
    with pytest.raises(ValueError, match="bad.json.*one per layer"):
        rp.load_profile(bad)


# ----------------------------------------------------------------------------- CLI

LINES = ["the quick brown fox jumps over the lazy dog", "a mixture of experts routes each token to a few experts",
         "question: what is two plus two? answer: four", "the router picks the top two experts for every token"]
RECORDS = [{"text": LINES[0]}, {"prompt": "the router picks ", "completion": "the top two experts"},
           {"query": "the quick brown fox", "choices": ["jumps", "sleeps"], "gold": 0},
           {"question": "what is two plus two?", "answer": "four"}, {"text": LINES[1] + " " + LINES[3]}]


def tiny_model_dir(ckpt_copy):
    """The tiny OLMoE checkpoint plus a sentencepiece tokenizer (96 pieces < 128 embedding rows, pad 0 bos 1 eos 2)."""
    import sentencepiece as spm
    path = ckpt_copy("olmoe")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(LINES * 10), model_writer=buf, vocab_size=96,
                                   model_type="bpe", hard_vocab_limit=False, character_coverage=1.0,
                                   pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2)
    (path / "tokenizer.model").write_bytes(buf.getvalue())
    return path


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_end_to_end(ckpt_copy, tmp_path, capsys):
    """The CLI writes a profile of every record's whole text (all four kinds; no EOS appended, as MoE-Sieve's
    profiler counts), its stats table and the heatmap."""
    model_dir = tiny_model_dir(ckpt_copy)
    calib = write_jsonl(tmp_path / "calib.jsonl", RECORDS)
    out, png = tmp_path / "profile.json", tmp_path / "profile.png"
    rp.main(["--model", str(model_dir), "--data", str(calib), "--out", str(out), "--plot", str(png),
             "--batch-size", "2", "--seq-len", "16", "--device", "cpu"])
    p = rp.load_profile(out)
    tok = tokenizer.load(model_dir)
    whole = [LINES[0], "the router picks the top two experts", "the quick brown fox jumps", "what is two plus two? four",
             LINES[1] + " " + LINES[3]]
    n = sum(len(tok.encode(t)[:16]) for t in whole)  # BOS + the text, cut at --seq-len 16
    assert p["tokens"] == n and p["samples"] == 5 and p["layers"] == [0, 1] and p["top_k"] == 2
    assert [sum(row) for row in p["counts"]] == [2 * n, 2 * n]
    assert p["cold_threshold"] == 0.5 and len(p["stats"]["per_layer"]) == 2
    stdout = capsys.readouterr().out
    assert "cov@25%" in stdout and "5/5 samples" in stdout
    try:
        import matplotlib  # noqa: F401
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert not png.exists() and "matplotlib is not installed" in stdout


def test_cli_samples_limit(ckpt_copy, tmp_path):
    """--samples N profiles N records drawn by a shuffle seeded with --seed (123 by default)."""
    model_dir = tiny_model_dir(ckpt_copy)
    out = tmp_path / "p.json"
    rp.main(["--model", str(model_dir), "--data", str(write_jsonl(tmp_path / "c.jsonl", RECORDS)), "--out", str(out),
             "--samples", "2", "--device", "cpu"])
    tok = tokenizer.load(model_dir)
    order = list(range(len(RECORDS)))
    random.Random(123).shuffle(order)
    assert rp.load_profile(out)["tokens"] == sum(len(tok.encode(data.record_text(RECORDS[i]))) for i in order[:2])


@pytest.mark.parametrize("broken", ["data", "model", "record"])
def test_cli_errors_leave_no_output(ckpt_copy, tmp_path, capsys, broken):
    """A missing --data file, a missing model directory or a bad record exits non-zero, names the file, writes nothing."""
    model_dir = tiny_model_dir(ckpt_copy)
    calib = write_jsonl(tmp_path / "calib.jsonl", RECORDS + ([{"txt": "typo"}] if broken == "record" else []))
    args = {"data": ["--model", str(model_dir), "--data", str(tmp_path / "nope.jsonl")],
            "model": ["--model", str(tmp_path / "no_model"), "--data", str(calib)],
            "record": ["--model", str(model_dir), "--data", str(calib)]}[broken]
    out = tmp_path / "profile.json"
    with pytest.raises(SystemExit) as e:
        rp.main(args + ["--out", str(out), "--device", "cpu"])
    assert e.value.code != 0 and not out.exists()
    err = capsys.readouterr().err
    assert {"data": "nope.jsonl", "model": "no_model", "record": "calib.jsonl:6"}[broken] in err


def test_plot_path_that_is_a_directory_is_refused_before_writing(ckpt_copy, tmp_path, capsys):
    """--plot naming an existing directory: refused before the run, so no profile JSON is left behind."""
    model_dir = tiny_model_dir(ckpt_copy)
    out, plot = tmp_path / "profile.json", tmp_path / "plots"
    plot.mkdir()
    with pytest.raises(SystemExit) as e:
        rp.main(["--model", str(model_dir), "--data", str(write_jsonl(tmp_path / "c.jsonl", RECORDS)), "--out", str(out),
                 "--plot", str(plot), "--device", "cpu"])
    assert e.value.code != 0 and not out.exists() and "is a directory" in capsys.readouterr().err


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Without matplotlib the heatmap is skipped with a one-line note, and no file is written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    p = {"model_type": "olmoe", "num_experts": 4, "top_k": 2, "layers": [0], "counts": [[1, 2, 3, 4]], "tokens": 5}
    assert plots.routing(p, tmp_path / "h.png") is False
    assert not (tmp_path / "h.png").exists() and "matplotlib is not installed" in capsys.readouterr().out


def test_profile_runs_without_autograd_when_the_base_requires_grad(checkpoints):
    """train.py profiles before it freezes the base, so the parameters still require gradients: the profile must
    switch autograd off itself (with it on, each batch's activations stayed tied to the mass tensor until the
    end: memory growing with the calibration set). Every module forward runs with gradients disabled."""
    from conftest import NoGradWatch, assert_no_graph
    model = hub.load_model(checkpoints("olmoe").path)
    model.requires_grad_(True)
    ids, mask = padded([12, 7, 3], "right")
    with NoGradWatch(model) as watch:
        p = rp.profile(model, [(ids, mask), (ids, mask)])
    watch.check()
    assert_no_graph(p)
    assert torch.is_grad_enabled()  # the caller's mode is given back
