"""train.py never saves bad state: non-finite weights and steps, unsafe or cut checkpoints, Ctrl-C and kill,
flags out of range; and the training arithmetic people get wrong (gradient accumulation, the lr schedule)."""
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from files import hub
import train
from conftest import FORWARD, tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv):
    return train.main([str(a) for a in argv])


def common(ckpt, train_file, steps=4):
    return ["--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 4, "--batch-size", 4,
            "--lr", 1e-2, "--dropout", 0, "--steps", steps]


def nan_model(ckpt, path, name="model.norm.weight"):
    """A copy of the checkpoint with one NaN in one tensor."""
    shutil.copytree(ckpt, path)
    f = next(p for p in os.listdir(path) if p.endswith(".safetensors"))
    tensors = load_file(os.path.join(path, f))
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, os.path.join(path, f), metadata={"format": "pt"})
    return str(path)


def test_a_nan_in_the_base_weights_is_refused_naming_the_tensor(ckpt, train_file, tmp_path, capsys):
    """One NaN in one base weight: exit 1, the tensor named, nothing written (it used to exit 0 with an all-NaN
    adapter and checkpoint)."""
    bad = nan_model(ckpt, tmp_path / "nan")
    out = tmp_path / "out"
    assert run(*common(bad, train_file), "--out", out) == 1
    err = capsys.readouterr().err
    assert "model.norm.weight" in err and "NaN" in err and not out.exists()


def test_a_non_finite_step_stops_and_keeps_the_last_checkpoint(ckpt, train_file, tmp_path, capsys, monkeypatch):
    """A step whose loss turns NaN (here: a NaN put into a base weight after the loader's check) stops at that
    step with an error naming it and the first non-finite gradient; the last good checkpoint is kept byte for
    byte, no adapter or newer checkpoint is written."""
    out = tmp_path / "run"
    assert run(*common(ckpt, train_file), "--out", out, "--save-every", 2, "--stop-after", 2) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("checkpoint")}
    load = hub.load_model

    def load_then_poison(*args, **kw):
        model = load(*args, **kw)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model
    monkeypatch.setattr(hub, "load_model", load_then_poison)
    assert run(*common(ckpt, train_file), "--out", out, "--resume") == 1
    err = capsys.readouterr().err
    assert "step 3:" in err and "not finite" in err and "first non-finite gradient: model.layers." in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name.startswith("checkpoint")} == before
    assert not (out / "adapter.safetensors").exists() and not (out / "summary.json").exists()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would create the marker file
        return (open, (self.marker, "w"))


def test_a_pickle_payload_in_checkpoint_pt_is_refused(ckpt, train_file, tmp_path, capsys):
    """checkpoint.pt that would build a Python object when unpickled: refused with an error naming the file,
    and the object is never built (loading a checkpoint cannot run code)."""
    out = tmp_path / "run"
    assert run(*common(ckpt, train_file), "--out", out, "--save-every", 2, "--stop-after", 2) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    marker = tmp_path / "pwned"
    state["log"] = _Payload(str(marker))
    torch.save(state, out / "checkpoint.pt")  # a valid file whose pickle builds an object
    assert run(*common(ckpt, train_file), "--out", out, "--resume") == 1
    err = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in err and "not a readable train.py checkpoint" in err
    assert not marker.exists()


def test_a_checkpoint_cut_in_half_is_named(ckpt, train_file, tmp_path, capsys):
    """checkpoint.pt cut to half its bytes: an error naming the file (it used to be '[Errno 22] Invalid argument')."""
    out = tmp_path / "run"
    assert run(*common(ckpt, train_file), "--out", out, "--save-every", 2, "--stop-after", 2) == 0
    raw = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(raw[: len(raw) // 2])
    assert run(*common(ckpt, train_file), "--out", out, "--resume") == 1
    assert f"{out / 'checkpoint.pt'} is not a readable train.py checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_kill_checkpoint_and_print_the_resume_command(ckpt, train_file, tmp_path, sig, code):
    """SIGINT / SIGTERM during training: the step finishes, a checkpoint is written, the exact --resume command
    is printed, exit 130 / 143; that command continues the run to the end."""
    out = tmp_path / "run"
    argv = [str(a) for a in common(ckpt, train_file, steps=400)] + ["--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in p.stdout:  # wait until training runs
        if line.startswith("step 2/"):
            break
    p.send_signal(sig)
    rest, err = p.communicate(timeout=300)
    assert p.returncode == code, err[-2000:]
    stopped = [line for line in rest.splitlines() if line.startswith("continue with: ")]
    assert stopped and "--resume" in stopped[0], rest[-2000:]
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 2 <= step < 400 and len((out / "log.jsonl").read_text().splitlines()) == step
    assert not (out / "adapter.safetensors").exists()
    cmd = stopped[0][len("continue with: "):]
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len((out / "log.jsonl").read_text().splitlines()) == 400 and (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("argv,named", [
    (["--sieve-frac", "0"], "--sieve-frac 0.0: must be in (0, 1]"),
    (["--sieve-k", "9"], "--sieve-k 9: must be in [1, 8]"),
    (["--seq-len", "1000"], "max_position_embeddings (128)"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be in [0, inf)"),
    (["--epochs", "nan"], "--epochs nan: must be in (0, inf)"),
    (["--perft-topk", "5"], "--perft-topk 5: must be at most --perft-experts (4)"),
    (["--calib", "missing.jsonl"], "--calib missing.jsonl: file not found")])
def test_flags_out_of_range_are_named_before_loading(ckpt, train_file, tmp_path, capsys, argv, named):
    """Each flag out of its range: exit 2 before anything is loaded, the flag and its allowed range named."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run("--model", ckpt, "--data", train_file, "--out", out, *argv)
    assert e.value.code == 2 and named in capsys.readouterr().err and not out.exists()


def test_out_that_is_a_file_and_long_sequences_allowed_knowingly(ckpt, train_file, tmp_path, capsys):
    """--out naming an existing file: refused before loading; --allow-long-seq lets --seq-len pass the limit."""
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit) as e:
        run("--model", ckpt, "--data", train_file, "--out", f)
    assert e.value.code == 2 and "exists and is not a directory" in capsys.readouterr().err
    assert run("--model", ckpt, "--method", "lora", "--seq-len", 1000, "--allow-long-seq", "--dry-run") == 0


def test_truncation_is_reported_once(ckpt, train_file, tmp_path, capsys):
    """Examples longer than --seq-len: one line with the records and tokens cut."""
    assert run(*common(ckpt, train_file, steps=1), "--seq-len", 8, "--out", tmp_path / "run") == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "--seq-len 8 cut" in x]
    assert len(lines) == 1 and "tokens)" in lines[0]


def test_gradient_accumulation_equals_the_bigger_batch(ckpt, train_file, tmp_path):
    """--batch-size 4 --grad-accum 1 and --batch-size 2 --grad-accum 2 see the same sequences per step and divide
    by the same target count: the same losses and adapter up to the order of fp32 sums (see below)."""
    base = ["--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 4, "--lr", 1e-2, "--dropout", 0,
            "--steps", 4]
    assert run(*base, "--batch-size", 4, "--grad-accum", 1, "--out", tmp_path / "big") == 0
    assert run(*base, "--batch-size", 2, "--grad-accum", 2, "--out", tmp_path / "acc") == 0
    curves = [[json.loads(x)["loss"] for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("big", "acc")]
    # a loss (~5) moves by at most twice its logits' error (FORWARD u of logits of about its size, see conftest),
    # from the split batch's other blockings, and as much again from adapters that earlier steps left different
    assert curves[1] == pytest.approx(curves[0], rel=tol(torch.float32, 1, 2 * FORWARD))
    a, b = (load_file(tmp_path / d / "adapter.safetensors") for d in ("big", "acc"))
    for k in a:  # not a rounding count: Adam's step is lr times a scale-free ratio of gradient moments, so an entry
        # moves by lr times its gradient's relative error, large where the gradient is near zero (k_proj): 1e-3 lr
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def args_for(lr=1.0, warmup=0.1, schedule="cosine"):
    return types.SimpleNamespace(lr=lr, warmup=warmup, schedule=schedule)


def test_lr_at_cosine_first_step_warmup_peak_and_end():
    """cosine, 100 steps, 10 of warm-up: lr/10 at the first step, the peak at the warm-up's last step and the next,
    half the peak midway through the decay, lr * (1 + cos(pi * 89/90)) / 2 at the last."""
    a = args_for(lr=2.0)
    assert train.lr_at(0, 100, a) == pytest.approx(0.2)
    assert train.lr_at(9, 100, a) == pytest.approx(2.0) and train.lr_at(10, 100, a) == pytest.approx(2.0)
    assert train.lr_at(55, 100, a) == pytest.approx(1.0)
    assert train.lr_at(99, 100, a) == pytest.approx(1.0 * (1 + math.cos(math.pi * 89 / 90)))
    assert train.lr_at(0, 100, args_for(warmup=0.0)) == pytest.approx(1.0)  # no warm-up: the peak at once


def test_lr_at_linear_is_hf_get_linear_schedule_with_warmup():
    """--schedule linear follows transformers' get_linear_schedule_with_warmup at every step."""
    from transformers import get_linear_schedule_with_warmup
    for warmup, total in ((0.0, 24), (0.1, 50), (0.25, 7)):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3e-4)
        sched = get_linear_schedule_with_warmup(opt, int(warmup * total), total)
        for step in range(total):
            assert train.lr_at(step, total, args_for(3e-4, warmup, "linear")) == pytest.approx(opt.param_groups[0]["lr"],
                                                                                               abs=1e-12), step
            opt.step()
            sched.step()


def test_init_config_keeps_rope_frequencies_fp32(ckpt, tmp_path):
    """--init-config with a bf16 dtype: the weights are bf16, RoPE's inv_freq buffer stays fp32."""
    args = train.flags.parse_args(["--method", "full", "--init-config", os.path.join(ckpt, "config.json"),
                                   "--data", os.path.join(ckpt, "config.json"), "--out", str(tmp_path / "o")])
    model, _ = train.build_model(args, torch.bfloat16, torch.device("cpu"), 1)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16 and model.inv_freq.dtype == torch.float32


def test_full_training_of_a_bf16_model_keeps_fp32_master_weights(ckpt, train_file, tmp_path):
    """--method full --dtype bfloat16: AdamW steps fp32 master copies (its state is fp32), the checkpoint holds
    them, and an update far below bf16's resolution still accumulates in the master weights."""
    out = tmp_path / "run"
    assert run("--model", ckpt, "--data", train_file, "--method", "full", "--dtype", "bfloat16", "--lr", 1e-5,
               "--steps", 2, "--batch-size", 4, "--out", out, "--warmup", 0) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for s in state["optimizer"]["state"].values() for k, v in s.items()
               if k != "step")
    weights = load_file(out / state["weights"])
    base = load_file(next(os.path.join(ckpt, f) for f in os.listdir(ckpt) if f.endswith(".safetensors")))
    name = "model.layers.0.self_attn.q_proj.weight"
    moved = (weights[name] - base[name].bfloat16().float()).abs()  # the run starts from the bf16-rounded weights
    # two Adam steps move a weight by at most ~lr each (2e-5 here, 3e-5 with slack), far below bf16's spacing near
    # these weights (~1e-3 at 0.2): stepped in bf16 nearly all of them would round back to where they were
    assert moved.max() < 3e-5 and (moved > 0).float().mean() > 0.9


def test_the_run_says_what_it_wrote_and_help_shows_defaults(ckpt, train_file, tmp_path, capsys):
    """The end of a run lists what it wrote (loss.png included) and the eval.py command for the adapter; the step
    line shows the process's resident memory on the CPU (not a constant 0); --help shows every default."""
    out = tmp_path / "run"
    assert run(*common(ckpt, train_file, steps=2), "--out", out) == 0
    text = capsys.readouterr().out
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG" and "loss.png" in text
    assert f"next: python eval.py --model {ckpt} --adapter {out}" in text
    rss = [float(line.split("| rss ")[1].split()[0]) for line in text.splitlines() if line.startswith("step ")]
    assert rss and all(r > 0 for r in rss)
    with pytest.raises(SystemExit):
        run("--help")
    help_text = capsys.readouterr().out
    assert "(default: 0.0004)" in help_text and "DESIGN" not in help_text and "STYLE" not in help_text


def test_recipe_sets_defaults_and_explicit_flags_win(ckpt, train_file):
    """--recipe moe-sieve sets the run flags to MoE-Sieve's setup; a flag given on the command line wins."""
    a = train.flags.parse_args(["--model", ckpt, "--data", train_file, "--recipe", "moe-sieve", "--allow-long-seq",
                                "--lr", "1e-3"])
    assert (a.loss_on, a.schedule, a.grad_accum, a.seq_len, a.rank, a.alpha, a.lr) == ("all", "linear", 8, 2048, 32, 64, 1e-3)


@pytest.mark.parametrize("recipe", ["moe-sieve", "perft", "dmep"])
def test_every_recipe_is_a_valid_run(ckpt, train_file, tmp_path, recipe):
    """Each paper's recipe gives flag values train.py accepts, and builds its adapters (a dry run)."""
    a = train.flags.parse_args(["--model", ckpt, "--data", train_file, "--recipe", recipe, "--allow-long-seq"])
    for dest, value in train.flags.RECIPES[recipe].items():
        assert getattr(a, dest) == value, dest
    assert train.main(["--model", ckpt, "--recipe", recipe, "--allow-long-seq", "--dry-run",
                       "--out", str(tmp_path / "o")]) == 0
