"""The memory model (training/memory.py, memcount.py, tools/memory.py): on tiny models its prediction on fake
tensors equals the peak of live tensors of the same code on real ones; CUDA's attention stand-in keeps no scores;
at OLMoE-1B-7B's shape the profile's peak does not grow with the calibration set, the sieve's step is below full
LoRA's and --grad-checkpoint below none (the dry run prints them); the README quotes what the command prints."""
import json
import os
import re

import pytest
import torch

from files import hub
import moe
from tests.tiny import _config_dict
from tools import memory as memory_tool
import train
from training import flags
from training import memcount
from training import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLMOE = os.path.join(ROOT, "tests", "data", "configs", "olmoe-1b-7b-0924")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """config.json of a tiny OLMoE and a tiny Mixtral (grouped kv heads), widths grouped_mm can take."""
    dirs = {}
    for model_type in ("olmoe", "mixtral"):
        d = tmp_path_factory.mktemp(model_type)
        c = _config_dict(model_type, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                         num_key_value_heads=2 if model_type == "mixtral" else 4)
        (d / "config.json").write_text(json.dumps(c))
        dirs[model_type] = str(d)
    return dirs


def step(model_dir, *flag_list, cuda=True, fake=True):
    args = flags.parse_args(["--model", model_dir, "--dry-run", "--rank", "4", *flag_list])
    cfg = hub.read_config(model_dir)
    return memory.step_peak(args, cfg, lambda m: train.attach_adapters(args, m, None, None), train.make_optimizer,
                            train.train_step, cuda, fake)


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
@pytest.mark.parametrize("method,extra", [("attn", []), ("lora", []), ("lora", ["--grad-checkpoint"]),
                                          ("sieve", []), ("perft-r", ["--grad-checkpoint"]), ("dmep", []),
                                          ("full", [])])
def test_fake_prediction_equals_live_tensors_of_the_same_step(tiny_dirs, model_type, method, extra):
    """train.py's step (forward, loss, backward, clipping, AdamW after its first step) on fake tensors and on real
    ones, the same code counted by the same LiveBytes (CPU paths both: no CUDA stand-ins, no 512-byte blocks;
    bf16, which fake grouped_mm requires): the peaks agree within 10%, and so does each part of the split. The
    sieve's rows routed to its experts are a real count on real tensors and the uniform share on fake ones."""
    flag_list = ["--method", method, "--batch-size", "2", "--seq-len", "64", "--dtype", "bfloat16", *extra]
    torch.manual_seed(0)
    predicted = step(tiny_dirs[model_type], *flag_list, cuda=False)
    measured = step(tiny_dirs[model_type], *flag_list, cuda=False, fake=False)
    assert abs(predicted["peak"] - measured["peak"]) <= 0.1 * measured["peak"], (predicted, measured)
    for kind in memcount.KINDS:
        assert abs(predicted["split"][kind] - measured["split"][kind]) <= 0.1 * measured["peak"], (kind, predicted, measured)


@pytest.mark.parametrize("model_type", ["olmoe", "mixtral"])
def test_fake_prediction_of_profile_evaluation_and_export_equals_live_tensors(tiny_dirs, model_type):
    """The same for router_profile.profile, eval.py's scoring of a batch and the merged export's merge."""
    cfg = hub.read_config(tiny_dirs[model_type])
    runs = [(lambda fake: memory.profile_peak(cfg, torch.bfloat16, 4, 64, 3, cuda=False, fake=fake)),
            (lambda fake: memory_tool.eval_peak(cfg, "lora", 4, 4, 64, cuda=False, fake=fake)),
            (lambda fake: memory_tool.export_peak(cfg, "lora", 4, cuda=False, fake=fake))]
    for run in runs:
        torch.manual_seed(0)
        predicted, measured = run(True), run(False)
        assert abs(predicted["peak"] - measured["peak"]) <= 0.1 * measured["peak"], (predicted, measured)


def test_cuda_attention_keeps_q_k_v_output_and_row_sums_never_scores():
    """CUDA's flash attention (no mask, bf16) keeps exactly q, k, v, the output and an fp32 log-sum-exp per row;
    with a mask and grouped kv heads CUDA takes the math path, which holds (B, H, T, T) fp32 scores."""
    B, H, T, S = 1, 4, 1024, 64
    with memcount.running() as mode:
        q, k, v = (torch.empty(B, H, T, S, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        live = memcount.LiveBytes(block=1)
        with live:
            y = memcount.cuda_sdpa(q, k, v, is_causal=True)
        assert live.total == y.nbytes + B * H * T * 4  # the output and the row sums: q, k, v are the caller's
        kv = torch.empty(B, 2, T, S, dtype=torch.bfloat16)
        mask = torch.ones(B, 1, T, T, dtype=torch.bool)
        live = memcount.LiveBytes(block=1)
        with live, torch.no_grad():
            memcount.cuda_sdpa(q, kv, kv, attn_mask=mask, enable_gqa=True)
        assert mode is not None and live.peak >= B * H * T * T * 4


def test_a_profile_share_sets_the_sieve_rows(tiny_dirs, tmp_path):
    """The rows routed to the sieve's experts follow the profile: a plan that covers all the routing costs more
    than the uniform share of a dry run."""
    cfg = hub.read_config(tiny_dirs["olmoe"])
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    prof = dict(model_type="olmoe", num_experts=8, top_k=2, layers=layers, counts=[[9, 9] + [0] * 6 for _ in layers],
                mass=[[1.0] * 8 for _ in layers], tokens=100)
    (tmp_path / "profile.json").write_text(json.dumps(prof))
    common = ["--method", "sieve", "--sieve-k", "2", "--batch-size", "2", "--seq-len", "64"]
    uniform = step(tiny_dirs["olmoe"], *common)
    covered = step(tiny_dirs["olmoe"], *common, "--profile", str(tmp_path / "profile.json"))
    assert uniform["shares"] == [0.25] and covered["shares"] == [1.0]
    assert covered["peak"] > uniform["peak"]


# ----------------------------------------------------------------------------- OLMoE-1B-7B's shape

def test_profile_peak_is_flat_in_the_calibration_size():
    """router_profile.profile at OLMoE-1B-7B's shape: 2 and 8 batches of 8 x 2048 tokens peak alike (no batch's
    graph or activations outlive it). With autograd on in the profile this grew by a batch's graph per batch."""
    cfg = hub.read_config(OLMOE)
    two, eight = (memory.profile_peak(cfg, torch.bfloat16, 8, 2048, n) for n in (2, 8))
    assert abs(eight["peak"] - two["peak"]) <= 0.01 * two["peak"], (two, eight)
    assert two["split"]["weights"] > 0.5 * two["peak"]


def test_dry_run_prints_the_peak_sieve_below_lora_checkpointing_below_none(capsys):
    """`train.py --model OLMoE-1B-7B --method lora --rank 16 --batch-size 4 --seq-len 2048 --dry-run` prints the
    predicted peak and its split; the sieve's is lower, and --grad-checkpoint's lower still; a card is judged."""
    peaks = {}
    for name, extra in (("lora", []), ("sieve", ["--method", "sieve"]), ("lora-ckpt", ["--grad-checkpoint"])):
        argv = ["--model", OLMOE, "--method", "lora", "--rank", "16", "--batch-size", "4", "--seq-len", "2048",
                "--dry-run", "--gpu-memory", "80", *extra]
        assert train.main(argv) == 0
        out = capsys.readouterr().out
        peaks[name] = float(re.search(r"^predicted peak: ([\d.]+) GiB$", out, re.M).group(1))
        assert "activations" in out and "optimizer" in out and "80 GiB (--gpu-memory)" in out
    assert peaks["sieve"] < peaks["lora"] and peaks["lora-ckpt"] < peaks["lora"], peaks
    assert peaks["lora"] > 12.9  # at least the bf16 weights (6.9B parameters)


def test_readme_quotes_what_the_command_prints():
    """The README's memory table is `python -m tools.memory --table`'s output: its first row (OLMoE-1B-7B,
    4 x 2048, every column) is made again here and must be in the README verbatim."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    lines = memory_tool.table(rows=1)
    assert all(line in readme.splitlines() for line in lines), "\n".join(lines)
    assert len([line for line in readme.splitlines() if line.startswith("| OLMoE-1B-7B |")
                or line.startswith("| Mixtral-8x7B |")]) >= len(memory_tool.TABLE)
