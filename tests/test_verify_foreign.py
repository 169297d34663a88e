"""verify.py's worked example: an implementation written another way (tests/foreign.py, gpt-fast's style) is
captured with tools/capture.py in its own process and compared. Its correct runs pass in fp32 and bf16 on every
model type; each planted bug of a port is named at the layer, tensor and token where it is made."""
import ast
import os

import pytest
import torch

from conftest import make_ids
from tests import foreign
from tests.foreign_capture import capture_foreign
from tools import capture
from tools import verify

MODELS = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")


@pytest.fixture(scope="module")
def golden(checkpoints, tmp_path_factory):
    """golden(name) -> (path of its golden file, ids): moe.py's fp32 reference on 2 x 8 fixed ids."""
    root, made = tmp_path_factory.mktemp("golden"), {}

    def get(name):
        if name not in made:
            ids, out = make_ids(2, 8), root / f"{name}.safetensors"
            code = run(["dump", "--model", checkpoints(name).path, "--ids",
                        ", ".join(" ".join(map(str, r)) for r in ids.tolist()), "--out", out])
            assert code == 0
            made[name] = out, ids
        return made[name]
    return get


def run(argv):
    with pytest.raises(SystemExit) as e:
        verify.main([str(a) for a in argv])
    return e.value.code


def verdict(golden, checkpoints, tmp_path, capsys, name="olmoe", dtype=torch.float32, bugs=(), plant=None,
            rename=None):
    """(exit status, stdout, the 'first divergence' line) of compare on the foreign run."""
    gfile, ids = golden(name)
    model = foreign.Transformer(str(checkpoints(name).path), dtype, bugs)
    target = None if plant is None else (dict(model.named_modules())[plant[0]], plant[1])
    theirs = tmp_path / "theirs.safetensors"
    capture_foreign(model, ids, theirs, dtype, target, rename)
    capsys.readouterr()
    code = run(["compare", gfile, theirs])
    out = capsys.readouterr()
    first = next((line for line in out.out.splitlines() if line.startswith("verify: first divergence")), "")
    return code, out.out + out.err, first


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreign_implementation_passes(golden, checkpoints, tmp_path, capsys, name, dtype):
    """The independent implementation agrees with the reference on every tensor it records, in fp32 and in bf16
    (the bf16 run's bound is what bf16 rounding does to each tensor), with its top-k in another order."""
    code, text, _ = verdict(golden, checkpoints, tmp_path, capsys, name, dtype)
    assert code == 0, text
    assert "no divergence" in text and "DIVERGES" not in text


@pytest.mark.parametrize("bugs, where", [
    ("softmax_after_topk", "layer 0, model.layers.0.mlp.topk_weights, token (b0, t0)"),
    ("interleaved_rope", "layer 0, model.layers.0.self_attn.q, token (b0, t1)"),  # position 0 does not rotate
    ("positions_off_by_one", "layer 0, model.layers.0.self_attn.q, token (b0, t0)"),
    ("gate_up_swapped", "layer 0, model.layers.0.mlp.experts.{e}"),
    ("norm_eps", "layer 0, model.layers.0.input_layernorm, token (b0, t0)"),
    ("routed_scale", "layer 0, model.layers.0.mlp, token (b0, t0)"),  # x1.03 after the weighted sum
    ("experts_shifted", "layer 0, model.layers.0.mlp.experts.{e}"),
    ("capacity", "layer 0, model.layers.0.mlp.experts.{dropped}"),
])
def test_planted_bug_named_where_it_is_made(golden, checkpoints, tmp_path, capsys, bugs, where):
    """Each classic porting bug, in fp32: exit 1 and the first divergence at its layer, tensor and token."""
    idx = verify.read_tensors(str(golden("olmoe")[0]))[0]["model.layers.0.mlp.topk_ids"].reshape(16, -1)
    tokens = {e: (idx == e).any(-1).nonzero().squeeze(1).tolist() for e in range(8)}
    first = min(e for e in tokens if tokens[e])  # expert rows come in expert order: the first expert with tokens
    cap = max(1, idx.numel() // 16)  # foreign.py's capacity: half the fair share of pairs, first come first served
    dropped = min(e for e in tokens if len(tokens[e]) > cap)
    at = lambda n: f"token (b{n // 8}, t{n % 8})"
    code, text, line = verdict(golden, checkpoints, tmp_path, capsys, bugs=(bugs,))
    assert code == 1, text
    assert where.format(e=f"{first}, {at(tokens[first][0])}", dropped=f"{dropped}, {at(tokens[dropped][cap])}") in line, line
    assert bugs != "capacity" or "dropped" in line


@pytest.mark.parametrize("target, tensor", [
    ("tok_embeddings", "before the first layer, model.embed_tokens"),
    ("layers.0.attention.wqkv", "layer 0, model.layers.0.self_attn.q_proj"),
    ("layers.0.attention.wo", "layer 0, model.layers.0.self_attn,"),
    ("layers.0.ffn_norm", "layer 0, model.layers.0.post_attention_layernorm"),
    ("layers.0.feed_forward.shared", "layer 0, model.layers.0.mlp.shared_expert,"),
    ("layers.2.feed_forward.cond_ffn", "layer 2, model.layers.2.mlp.experts."),
    ("layers.1", "layer 1, model.layers.1,"),
    ("output", "after the last layer, lm_head"),
])
def test_a_3_percent_error_of_one_tensor_caught_in_bf16(golden, checkpoints, tmp_path, capsys, target, tensor):
    """In a bf16 run, one module's output scaled by 0.97 is named at that tensor (Qwen2-MoE: a shared expert,
    a dense layer 1): the bound follows what bf16 does to each tensor, not the run's depth."""
    code, text, first = verdict(golden, checkpoints, tmp_path, capsys, "qwen2_moe", torch.bfloat16,
                                plant=(target, lambda out: out * 0.97))
    assert code == 1 and tensor in first, text


def test_nan_named_where_it_appears(golden, checkpoints, tmp_path, capsys):
    """NaN from layer 1's attention output on: exit 1 at model.layers.1.self_attn, not a pass."""
    code, text, first = verdict(golden, checkpoints, tmp_path, capsys, plant=("layers.1.attention.wo",
                                                                              lambda out: out * float("nan")))
    assert code == 1 and "layer 1, model.layers.1.self_attn, token (b0, t0): not finite (nan)" in first, text


def test_misspelled_name_fails_and_foreign_names_are_listed(golden, checkpoints, tmp_path, capsys):
    """A name one letter off a known one fails at its layer; a name of the implementation's own is listed."""
    code, text, first = verdict(golden, checkpoints, tmp_path, capsys, rename={
        "model.layers.1.self_attn.o_proj.input": "model.layers.1.self_attn.o_prj.input",
        "model.layers.0.self_attn": "model.layer.0.self_attn", "model.norm": "transformer.ln_f"})
    assert code == 1 and "layer 0, model.layer.0.self_attn: not a name" in first, text
    assert "did you mean model.layers.0.self_attn?" in first and "model.layers.1.self_attn.o_prj.input" in text
    assert "names verify does not know (not compared): transformer.ln_f" in text


def test_capture_kit_depends_on_torch_and_safetensors_only():
    """tools/capture.py runs in a verifier's process: it imports torch, safetensors and the standard library only,
    writes the header format verify.py reads, and its record() is a no-op outside a Capture."""
    tree = ast.parse(open(os.path.join(os.path.dirname(__file__), "..", "tools", "capture.py")).read())
    roots = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
             for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert roots <= {"torch", "safetensors", "json", "contextlib"}, roots
    assert capture.FORMAT == verify.THEIRS
    capture.record("lm_head", torch.zeros(1))  # outside a Capture: nothing, so record lines may stay in your code
    with capture.Capture(torch.zeros(2, 3, dtype=torch.long), dtype=torch.bfloat16) as cap:
        capture.record("model.norm", torch.zeros(6, 4))  # (B*T, D) rows become (B, T, D)
        with pytest.raises(ValueError, match="recorded twice"):
            cap.record("model.norm", torch.zeros(2, 3, 4))
    assert cap.tensors["model.norm"].shape == (2, 3, 4) and cap.run == {"compute": "bfloat16", "params": "bfloat16"}
