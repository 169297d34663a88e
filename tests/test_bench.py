"""bench.py on the CPU at tiny size: every requested row runs, the table and the JSON come out (no timing asserted)."""
import json

import pytest
import torch

import bench
import moe


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


def test_methods_selects_rows_and_rejects_unknown(capsys):
    """--methods runs only the named rows; an unknown name is an argparse error."""
    result = bench.main(["--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0", "--methods", "attn,perft-e"])
    assert [r["method"] for r in result["rows"]] == ["attn", "perft-e"]
    assert all(r["vs_peft"] is None for r in result["rows"])  # no peft row to compare with
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--methods", "attn,nope"])


def test_flop_count_of_olmoe_matches_design():
    """OLMoE-1B-7B at T=2048: about 5.5 GFLOP per token for forward + activation backward (DESIGN.md §6)."""
    cfg = moe.Config.from_json(bench.OLMOE)
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
