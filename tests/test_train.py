"""train.py end to end on tiny checkpoints, on the CPU; and its dry run on the real OLMoE / Mixtral configs."""
import json
import os

import pytest
import torch

from files import data
from files import hub
import train
from conftest import CONFIGS, assert_logits_close
from tiny import SENTENCES, tiny_checkpoint
import methods

def run(*argv):
    return train.main([str(a) for a in argv])


@pytest.mark.parametrize("method,expected", [("lora", 311_459_840), ("sieve", 84_967_424)])
def test_dry_run_matches_moe_sieve_paper_counts(method, expected, capsys):
    """At r=32 on OLMoE-1B-7B's real config: full LoRA 311.5M trainable parameters, top-25% sieve 85.0M."""
    assert run("--model", f"{CONFIGS}/olmoe-1b-7b-0924", "--method", method, "--rank", 32, "--dry-run") == 0
    out = capsys.readouterr().out
    assert f"trainable parameters: {expected:,}" in out
    assert f"({expected / 1e6:.1f}M)" in out and ("311.5M" in out or "85.0M" in out)


def test_dry_run_mixtral_reads_no_weights(capsys):
    """The Mixtral-8x7B dry run works from config.json alone (no safetensors in the directory)."""
    assert run("--model", f"{CONFIGS}/mixtral-8x7b-v0.1", "--method", "lora", "--rank", 16, "--dry-run") == 0
    # attention (4096+4096 + 2*(4096+1024)) * 16 * 32 layers + router (4096+8)*16*32 + experts 8*3*(4096+14336)*16*32
    want = 32 * 16 * (2 * 8192 + 2 * 5120 + 4104 + 8 * 3 * 18432)
    assert f"trainable parameters: {want:,}" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["attn", "lora", "sieve", "random", "coverage", "budget",
                                    "perft-s", "perft-d", "perft-r", "perft-e", "dmep"])
def test_every_method_trains_end_to_end(ckpt, train_file, tmp_path, method):
    """Each method runs: profile/plan where needed, training, adapter + summary + log written, adapter reloads."""
    out = tmp_path / method
    assert run("--model", ckpt, "--data", train_file, "--method", method, "--rank", 4, "--steps", 2,
               "--batch-size", 4, "--out", out, "--seq-len", 64) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    model = hub.load_model(ckpt)
    config = methods.load_adapter(model, out)
    assert config["method"] == method and methods.count_trainable(model) == summary["trainable_params"]
    if method in ("sieve", "random", "coverage", "budget"):
        assert (out / "plan.json").exists() and (out / "profile.json").exists()


def test_thirty_steps_lower_the_loss(ckpt, train_file, tmp_path):
    """30 steps of full LoRA lower the training loss clearly (mean of the last 5 < mean of the first 5)."""
    out = tmp_path / "run"
    assert run("--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 8, "--steps", 30, "--lr", 5e-3,
               "--batch-size", 8, "--out", out, "--dropout", 0, "--warmup", 0) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("method", ["sieve", "dmep"])  # dmep: prunes at step 1, checkpoints the pruned adapter
def test_resume_reproduces_the_loss_curve_bit_for_bit(ckpt, train_file, tmp_path, method):
    """Stopping after a checkpoint and resuming gives exactly the loss curve and adapter of one uninterrupted run."""
    common = ["--model", ckpt, "--data", train_file, "--method", method, "--rank", 4, "--batch-size", 4,
              "--lr", 1e-2, "--dropout", 0.1, "--steps", 6]
    assert run(*common, "--out", tmp_path / "full") == 0
    assert run(*common, "--out", tmp_path / "cut", "--save-every", 3, "--stop-after", 3) == 0  # "interrupted"
    assert not (tmp_path / "cut" / "adapter.safetensors").exists()
    assert run(*common, "--out", tmp_path / "cut", "--resume") == 0
    full = [json.loads(x)["loss"] for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    cut = [json.loads(x)["loss"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert full == cut
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "full" / "adapter.safetensors"), load_file(tmp_path / "cut" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "dmep":  # the summary's before/after report survives the resume (pruned at step 1 of 6)
        full, cut = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "cut"))
        assert full["trainable_before_prune"] == cut["trainable_before_prune"] > full["trainable_params"]
        assert full["tok_s_before_prune"] is None  # step 1 is the first step, left out: nothing to measure


def test_resume_survives_a_kill_between_the_checkpoint_writes(ckpt, train_file, tmp_path):
    """A run killed after writing a step's tensors but before checkpoint.pt resumes from the previous, consistent
    pair (checkpoint.pt names its tensor file), and ends with the uninterrupted run's loss curve; the stale
    tensor files are removed."""
    common = ["--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 4, "--batch-size", 4,
              "--lr", 1e-2, "--steps", 4, "--dropout", 0]
    assert run(*common, "--out", tmp_path / "full") == 0
    cut = tmp_path / "cut"
    assert run(*common, "--out", cut, "--save-every", 2, "--stop-after", 2) == 0
    from safetensors.torch import load_file, save_file
    save_file({k: v + 1 for k, v in load_file(cut / "checkpoint-2.safetensors").items()}, cut / "checkpoint-3.safetensors")
    assert run(*common, "--out", cut, "--resume") == 0  # the half-written step 3 is ignored
    curves = [[json.loads(x)["loss"] for x in (d / "log.jsonl").read_text().splitlines()] for d in (tmp_path / "full", cut)]
    assert curves[0] == curves[1]
    assert sorted(f.name for f in cut.glob("checkpoint*")) == ["checkpoint-4.safetensors", "checkpoint.pt"]


def test_resume_refuses_other_run_arguments(ckpt, train_file, tmp_path, capsys):
    """--resume with another learning rate (or any argument that defines the run) or a --stop-after the checkpoint
    has already passed: a clear error naming the flag, exit 1, the checkpoint untouched."""
    common = ["--model", ckpt, "--data", train_file, "--method", "attn", "--rank", 4, "--steps", 4]
    out = tmp_path / "run"
    assert run(*common, "--out", out, "--lr", 1e-2, "--save-every", 2, "--stop-after", 2) == 0
    before = (out / "checkpoint.pt").read_bytes()
    assert run(*common, "--out", out, "--lr", 2e-2, "--resume") == 1
    assert "--lr (0.01, now 0.02)" in capsys.readouterr().err
    assert run(*common, "--out", out, "--lr", 1e-2, "--resume", "--stop-after", 2) == 1
    assert "already at step 2" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before


def test_torchrun_schedule_gives_every_process_a_share():
    """Under torchrun an epoch's last micro-batch is dropped when it has fewer sequences than processes (21
    sequences in micro-batches of 4 leave 1: a second process would have nothing and the first would wait for it)."""
    one, two = data.step_schedule(21, 4, 1, epochs=3), data.step_schedule(21, 4, 1, epochs=3, world=2)
    assert min(len(mb) for step in one for mb in step) == 1
    assert min(len(mb) for step in two for mb in step) >= 2 and len(two) == len(one)
    with pytest.raises(ValueError, match="fewer than the 2 processes"):
        data.step_schedule(1, 4, 1, epochs=3, world=2)


def test_merged_export_loads_and_equals_the_adapter(ckpt, train_file, tmp_path):
    """--export-merged writes a checkpoint whose logits equal base + adapter (here loaded by our loader)."""
    out = tmp_path / "run"
    assert run("--model", ckpt, "--data", train_file, "--method", "sieve", "--rank", 4, "--steps", 3, "--lr", 1e-2,
               "--batch-size", 4, "--out", out, "--export-merged") == 0
    x = torch.randint(3, 300, (2, 16))
    adapted = hub.load_model(ckpt)
    methods.load_adapter(adapted, out)
    merged = hub.load_model(str(out / "merged"))
    assert_logits_close(merged(x), adapted(x))  # merging rounds each weight once more (see test_lora)
    assert (out / "merged" / "tokenizer.model").exists() and (out / "merged" / "model.safetensors.index.json").exists()


# ------------------------------------------------------------------ bad input: clear error, non-zero exit, no output

def bad(tmp_path, capsys, *argv):
    """Run with bad input: a non-zero exit (argparse's 2 for a flag checked before loading, 1 after)."""
    out = tmp_path / "out"
    try:
        code = run(*argv, "--out", out)
    except SystemExit as e:
        code = e.code
    assert code != 0
    assert not out.exists(), "no output may be written for bad input"
    return capsys.readouterr().err


def test_empty_jsonl_is_refused(ckpt, tmp_path, capsys):
    """An empty data file: the error names the file."""
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    assert "empty.jsonl" in bad(tmp_path, capsys, "--model", ckpt, "--data", f, "--method", "attn")


def test_malformed_line_is_named_by_number(ckpt, tmp_path, capsys):
    """A malformed JSON line: the error names the file and the line number."""
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    assert "bad.jsonl:3" in bad(tmp_path, capsys, "--model", ckpt, "--data", f, "--method", "attn")


def test_record_with_unknown_fields_is_refused(ckpt, tmp_path, capsys):
    """A record with none of the known fields: the error names the file, line and the keys found."""
    f = tmp_path / "odd.jsonl"
    f.write_text('{"text": "ok"}\n{"input": "x", "output": "y"}\n')
    err = bad(tmp_path, capsys, "--model", ckpt, "--data", f, "--method", "attn")
    assert "odd.jsonl:2" in err and "input" in err


def test_missing_model_directory_is_refused(train_file, tmp_path, capsys):
    """A model directory that does not exist is named in the error."""
    assert "no_such_model" in bad(tmp_path, capsys, "--model", tmp_path / "no_such_model", "--data", train_file)


def test_adapter_for_another_base_is_refused_by_the_script(ckpt, train_file, tmp_path, capsys):
    """--adapter made on another base model: refused, naming the mismatch, nothing exported."""
    other = tiny_checkpoint(tmp_path / "other", hidden_size=64)
    a = tmp_path / "a"
    assert run("--model", other, "--data", train_file, "--method", "attn", "--rank", 4, "--steps", 1, "--out", a) == 0
    out = tmp_path / "out"
    assert run("--model", ckpt, "--adapter", a, "--export-merged", "--out", out) != 0
    assert "fingerprint" in capsys.readouterr().err and not (out / "merged").exists()


@pytest.mark.parametrize("flag,value", [("--rank", "0"), ("--lr", "-1"), ("--warmup", "1.5"), ("--dmep-warmup", "1"),
                                        ("--log-every", "0"), ("--save-every", "-1"), ("--stop-after", "0"),
                                        ("--dmep-targets", "q_prj,v_proj")])
def test_bad_hyperparameters_are_refused(ckpt, train_file, tmp_path, capsys, flag, value):
    """Rank 0, a negative learning rate, a warm-up fraction of 1 or more, no log interval, a misspelled DMEP
    target (it would be silently left out): argparse-style error naming the flag, exit code 2, no output."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        run("--model", ckpt, "--data", train_file, flag, value, "--out", out)
    assert e.value.code == 2 and flag in capsys.readouterr().err and not out.exists()


def test_exports_from_a_saved_adapter_without_training(ckpt, train_file, tmp_path):
    """--adapter DIR --export-peft --export-merged writes both exports from a saved adapter, no training."""
    a = tmp_path / "a"
    assert run("--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 4, "--steps", 1, "--out", a) == 0
    out = tmp_path / "exports"
    assert run("--model", ckpt, "--adapter", a, "--export-peft", "--export-merged", "--out", out) == 0
    assert (out / "peft" / "adapter_model.safetensors").exists() and (out / "peft" / "adapter_config.json").exists()
    assert (out / "merged" / "config.json").exists() and not (out / "summary.json").exists()


def test_export_onto_a_file_writes_neither_export(ckpt, train_file, tmp_path, capsys):
    """--export-peft --export-merged where OUT/merged is an existing file: refused before either is written."""
    a = tmp_path / "a"
    assert run("--model", ckpt, "--data", train_file, "--method", "lora", "--rank", 4, "--steps", 1, "--out", a) == 0
    out = tmp_path / "exports"
    out.mkdir()
    (out / "merged").write_text("a file")
    assert run("--model", ckpt, "--adapter", a, "--export-peft", "--export-merged", "--out", out) == 1
    assert "merged: exists and is not a directory" in capsys.readouterr().err and not (out / "peft").exists()


def test_compile_in_fp32_is_refused(ckpt, train_file, tmp_path, capsys):
    """--compile with an fp32 base (the CPU default): a clear error naming the flag, exit 1, nothing written."""
    out = tmp_path / "run"
    assert run("--model", ckpt, "--data", train_file, "--out", out, "--compile", "--steps", 1) == 1
    assert "--compile needs --dtype bfloat16" in capsys.readouterr().err and not out.exists()
