"""bench.py on the CPU at tiny size: every requested row runs, the table and the JSON come out (no timing asserted)."""
import json

import pytest
import torch

from tools import bench
from files import hub
import moe
from tools import targets


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared, busy CPU OpenMP's barriers make them crawl."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_tiny_cpu_run_gives_every_row_table_and_json(tmp_path, capsys):
    """`bench.py --device cpu --tiny` times every row (ours and transformers + peft) and writes the JSON."""
    out = tmp_path / "results.json"
    result = bench.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    names = [r["method"] for r in result["rows"]]
    assert names == list(bench.ROWS)
    for r in result["rows"]:
        assert r["status"] == "ok", r
        assert r["tok_s"] > 0 and r["trainable"] > 0 and r["peak_gib"] is None and r["mfu"] is None
        assert abs(r["loss"] - 5.545) < 0.1, r  # random weights: about ln(vocab 256)
        assert r["vs_peft"] is not None
        assert any(line.startswith(r["method"] + " ") for line in printed.splitlines()), r["method"]
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["peft-attn"]["trainable"] == rows["attn"]["trainable"]  # same rank, same places
    assert rows["sieve"]["trainable"] < rows["lora"]["trainable"]
    assert rows["dmep-pruned"]["trainable"] < rows["dmep"]["trainable"]
    saved = json.loads(out.read_text())
    assert saved["table"] == result["table"] and saved["argv"][:2] == ["--device", "cpu"]
    assert {"torch", "transformers", "peft"} <= set(saved["versions"]) and saved["date"] and saved["command"]
    # a tiny model on the CPU is not the run the targets were set for: the ratios are printed, with no verdict
    # (the sieve's ratio is listed only when lora's step is slower than attn's: one CPU step of a tiny model may not be)
    assert [t["target"] for t in saved["targets"]][0] == "lora tok/s / peft-lora tok/s"
    assert all(t["met"] is None for t in saved["targets"]) and saved["no_verdict"]
    lines = [line for line in printed.splitlines() if line.startswith("target: ")]
    assert lines and all(line.endswith(": no verdict") for line in lines), lines
    assert "lora tok/s / peft-lora tok/s" in lines[0]


def test_targets_are_judged_from_the_rows():
    """Issue 6's targets come from the rows: tok/s and peak ratios to peft-lora, the sieve's added time over
    attn against lora's, the 8 x 2048 fit and the FLOP-ceiling share on CUDA; a failed row judges nothing."""
    row = lambda m, tok_s, step_s, peak: dict(method=m, status="ok", tok_s=tok_s, step_s=step_s, peak_gib=peak)
    rows = [row("attn", 60e3, 0.10, 30.0), row("lora", 50e3, 0.20, 31.0), row("sieve", 55e3, 0.15, 30.5),
            row("peft-lora", 20e3, 0.40, 58.0), dict(method="perft-e", status="OOM")]
    got = {t["target"]: t for t in targets.judge_targets(rows, 5.52e9, 8 * 2048, cuda=True)}
    assert got["lora tok/s / peft-lora tok/s"]["value"] == 2.5 and got["lora tok/s / peft-lora tok/s"]["met"]
    assert abs(got["lora peak / peft-lora peak"]["value"] - 31 / 58) < 1e-12 and got["lora peak / peft-lora peak"]["met"]
    assert got["lora peak GiB at 16384 tokens (80 GB)"]["met"]
    assert abs(got["sieve's expert-LoRA time / lora's"]["value"] - 0.5) < 1e-12
    share = got["attn tok/s x FLOP/token / 800 TFLOP/s"]
    assert abs(share["value"] - 60e3 * 5.52e9 / 800e12) < 1e-12 and share["met"]  # 0.414
    rows[2]["step_s"] = 0.17  # the sieve now adds 0.07 s against lora's 0.10: 0.7 > 0.6
    assert not {t["target"]: t for t in targets.judge_targets(rows, 5.52e9, 4 * 2048, cuda=True)}[
        "sieve's expert-LoRA time / lora's"]["met"]
    cpu = [t["target"] for t in targets.judge_targets(rows, 5.52e9, 8 * 2048, cuda=False)]
    assert cpu == ["lora tok/s / peft-lora tok/s", "sieve's expert-LoRA time / lora's"]  # no memory, no ceiling
    rows[3]["status"] = "OOM"
    assert "lora tok/s / peft-lora tok/s" not in [t["target"] for t in targets.judge_targets(rows, 5.52e9, 8192, True)]
    rows[1] = dict(method="lora", status="OOM")
    assert not {t["target"]: t for t in targets.judge_targets(rows, 5.52e9, 8 * 2048, cuda=True)}[
        "lora peak GiB at 16384 tokens (80 GB)"]["met"]


H100 = dict(type="cuda", name="NVIDIA H100 80GB HBM3", capability=[9, 0], gib=79.2)
H200 = dict(type="cuda", name="NVIDIA H200", capability=[9, 0], gib=139.8)
A100 = dict(type="cuda", name="NVIDIA A100-SXM4-80GB", capability=[8, 0], gib=79.1)
CPU = dict(type="cpu", name="x86_64", capability=None, gib=None)


def test_verdicts_only_on_the_shape_and_gpu_the_targets_were_set_for():
    """Issue 6's targets are judged on the OLMoE-1B-7B shape (r 16, 4 or 8 x 2048) and Mixtral-8x7B (1 x 2048,
    grad checkpoint, H200) on an sm90 GPU only; any other shape or device gets the ratios and no verdict."""
    scope = lambda argv, gpu: targets.verdict_scope(bench.parse_args(argv), bench.config_dict(bench.parse_args(argv)), gpu)
    assert scope([], H100) == ("olmoe", None) and scope(["--batch", "8"], H200) == ("olmoe", None)
    for gpu in (CPU, A100):
        shape, why = scope([], gpu)
        assert shape == "olmoe" and "H100/H200" in why
    for argv in (["--tiny"], ["--layers", "4"], ["--rank", "8"], ["--seq", "1024"], ["--batch", "2"]):
        shape, why = scope(argv, H100)
        assert shape is None and "OLMoE-1B-7B" in why, argv
    mixtral = ["--config", targets.MIXTRAL, "--batch", "1", "--grad-checkpoint"]
    assert scope(mixtral, H200) == ("mixtral", None)
    assert scope(mixtral, H100)[1] and scope(mixtral[:-1], H200)[0] is None  # 80 GB; no grad checkpoint
    row = lambda m, tok_s: dict(method=m, status="ok", tok_s=tok_s, step_s=1.0, peak_gib=100.0)
    got = targets.judge_targets([row("lora", 4000.0), row("peft-lora", 1900.0)], 1e9, 2048, True, "mixtral")
    assert [(t["target"], t["met"]) for t in got] == [("lora tok/s (transformers + peft: 1,897)", True)]
    rows = [row("attn", 60e3), row("lora", 50e3), row("peft-lora", 20e3)]
    unjudged = targets.judge_targets(rows, 5.52e9, 4 * 2048, True, verdict=False)
    assert unjudged and all(t["met"] is None for t in unjudged)
    assert [t["value"] for t in unjudged] == [t["value"] for t in targets.judge_targets(rows, 5.52e9, 4 * 2048, True)]


def test_methods_selects_rows_and_rejects_unknown(capsys):
    """--methods runs only the named rows; an unknown name is an argparse error."""
    result = bench.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--methods", "attn,perft-e"])
    assert [r["method"] for r in result["rows"]] == ["attn", "perft-e"]
    assert all(r["vs_peft"] is None for r in result["rows"])  # no peft row to compare with
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--methods", "attn,nope"])


def test_compiled_rows_each_compile_their_own_blocks(monkeypatch, caplog):
    """--compile over many rows: each row compiles its blocks afresh, so no row finds dynamo's cache (8 graphs per
    function) filled by the rows before it and silently runs eagerly. (Dynamo's eager backend: tracing only.)"""
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    result = bench.main(["--device", "cpu", "--tiny", "--compile", "--steps", "1", "--warmup", "1",
                         "--methods", "attn,lora,perft-e,perft-r,dmep"])
    torch._dynamo.reset()
    assert all(r["status"] == "ok" for r in result["rows"])
    assert "recompile_limit" not in caplog.text and "cache_size_limit" not in caplog.text


def test_flop_count_of_olmoe_matches_design():
    """OLMoE-1B-7B at T=2048: about 5.5 GFLOP per token for forward + activation backward (1.3B active
    parameters x 4, plus attention)."""
    cfg = hub.read_config(bench.OLMOE)
    assert 5.45e9 < bench.flops_per_token(cfg, 2048) < 5.6e9


def test_traffic_counts_one_layer_without_a_gpu(capsys):
    """--traffic counts bytes on meta tensors: one layer's flash attention is q, k, v and o once forward; the
    eager step has no scatter-add back to (token, slot) order, no cat in backward (RoPE, SwiGLU) and none of
    RMSNorm's fp32 passes (pow) left; LoRA on the experts adds traffic; the sieve is reported as not countable."""
    result = bench.main(["--traffic", "--tiny", "--methods", "attn,lora,sieve", "--top", "3"])
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["sieve"]["status"].startswith("skipped")
    B, T, D = 2, 32, bench.TINY["hidden_size"]
    ops = dict(rows["attn"]["top"])
    assert ops["fwd sdpa (flash)"] * 2**30 == 4 * B * T * D * 2  # bf16 q, k, v (4 kv heads = 4 heads), o
    assert not {"bwd index_add", "bwd cat", "fwd pow", "bwd pow"} & set(ops), sorted(ops)
    total = {m: sum(rows[m]["gib_per_layer"].values()) for m in ("attn", "lora")}
    assert 0 < total["attn"] < total["lora"]
    assert "lora " in capsys.readouterr().out


def test_plain_puts_our_rows_on_the_plain_path(monkeypatch, capsys):
    """--plain calls model.set_plain(True) on each of our rows (not on peft's)."""
    real, calls = moe.Transformer.set_plain, []

    def spy(self, on):
        calls.append(on)
        real(self, on)

    monkeypatch.setattr(moe.Transformer, "set_plain", spy)
    argv = ["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--methods", "attn,lora,peft-attn"]
    result = bench.main(argv + ["--plain"])
    assert calls == [True, True] and all(r["status"] == "ok" for r in result["rows"])
    assert result["plain"] and "plain path (ours)" in capsys.readouterr().out
