"""verify.py: golden tensors agree with themselves and with transformers, and a planted difference is found at
the layer, tensor and token where it is made."""
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from files import hub
from tools import verify
from conftest import FORWARD, FP32_VARIANTS, VARIANTS, assert_logits_close, assert_within, make_ids
import methods


def ours(path, dtype=torch.float32):
    model = hub.load_model(str(path), dtype=dtype)
    model.set_plain(True)
    return model


def golden_of(model, ids, grad=False):
    t = verify.collect(model, model.config, ids, grad=grad)
    return t, verify.make_header(t, model.config)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        verify.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_dump_then_compare_with_itself(checkpoints, tmp_path, capsys):
    """dump writes a golden file whose header lists every tensor in forward order; compared with itself, it passes."""
    path, out = checkpoints("qwen2_moe").path, tmp_path / "golden.safetensors"
    code, text, _ = run_cli(["dump", "--model", path, "--ids", "5 9 17 33 64 3, 7 8 9 10 11 12", "--out", out], capsys)
    assert code == 0 and f"to {out}" in text
    tensors, header = verify.read_tensors(str(out), need_header=True)
    names = [e["name"] for e in header["tensors"]]
    assert names == list(tensors) or set(names) == set(tensors)
    for n in ("model.embed_tokens", "model.layers.0.self_attn.q", "model.layers.0.mlp.gate", "model.layers.0.mlp.topk_ids",
              "model.layers.0.mlp.shared_expert", "model.layers.1.mlp", "model.layers.2.mlp.experts", "lm_head", "loss"):
        assert n in names, n
    assert names.index("model.layers.0.self_attn.q") < names.index("model.layers.0.mlp.gate") < names.index("model.layers.1")
    assert "model.layers.1.mlp.gate" not in names  # layer 1 is a dense MLP
    assert tensors["model.layers.0.self_attn.q"].shape == (2, 6, 4, 16)
    code, text, _ = run_cli(["compare", out, out], capsys)
    assert code == 0 and "no divergence" in text


def test_tensors_in_what_order_and_described(checkpoints):
    """Every recorded tensor has a WHAT description, and the file lists them in WHAT's order (the order moe.py's
    forward makes them, shared expert included), so the table a reader consults is the file's own order."""
    model = ours(checkpoints("qwen2_moe").path)
    _, header = golden_of(model, make_ids(1, 6))
    top, parts = list(verify.WHAT), list(verify.WHAT["model.layers.i"])

    def rank(name):  # (place in WHAT, layer, place among a layer's tensors); expert rows share their rank
        m = re.fullmatch(r"model\.layers\.(\d+)\.?(.*)", name)
        if m:
            return top.index("model.layers.i"), int(m[1]), parts.index(re.sub(r"experts\.\d+$", "experts.*", m[2]))
        return top.index(name), 0, 0

    names = [e["name"] for e in header["tensors"]]
    assert names == sorted(names, key=rank) and "model.layers.0.mlp.shared_expert_gate" in names
    assert all(isinstance(e["what"], str) for e in header["tensors"])


def test_golden_values_are_the_models(checkpoints):
    """The recorded logits are the model's logits (fast path), the loss their mean next-token cross-entropy, and
    the weighted sum of the recorded expert rows is the recorded routed-expert output."""
    model = ours(checkpoints("olmoe").path)
    ids = make_ids(2, 8)
    g, _ = golden_of(model, ids)
    model.set_expert_path("fast")
    logits = model(ids)
    assert_logits_close(g["lm_head"], logits.detach())  # the two expert paths differ by rounding only
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    # cross-entropy moves by at most twice its logits' error (logsumexp and the target logit), plus the mean of
    # 14 terms: 2 FORWARD + 16 u of the largest logit
    assert_within(g["loss"], loss.detach(), 2 * FORWARD + 16, magnitude=logits.detach().abs().max())
    p = "model.layers.1.mlp."
    idx, w = g[p + "topk_ids"].reshape(16, -1), g[p + "topk_weights"].reshape(16, -1)
    total = torch.zeros(16, 64)
    for e in range(8):
        tok = (idx == e).any(-1).nonzero().squeeze(1)
        if len(tok):
            total[tok] += g[f"{p}experts.{e}"] * (w * (idx == e)).sum(-1)[tok, None]
    # the same rows and weights, combined in another order: a product and a sum of K = 2 terms, a few roundings
    assert_within(total, g[p + "experts"].reshape(16, -1), 8)


def test_perturbed_expert_found_at_its_layer_and_expert(checkpoints):
    """One expert's weights scaled by 1 + 1e-4: the first divergence is that expert's rows, in that layer."""
    model = ours(checkpoints("olmoe").path)
    ids = make_ids(2, 8)
    golden, header = golden_of(model, ids)
    e = int(golden["model.layers.1.mlp.topk_ids"].reshape(-1)[5])  # an expert some token uses
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[e] *= 1 + 1e-4
    theirs, _ = golden_of(model, ids)
    rows, first, missing = verify.compare(golden, theirs, header)
    assert first[:2] == (f"model.layers.1.mlp.experts.{e}", 1) and not missing
    assert all(not bad for name, *_, bad in rows if name.startswith(("model.embed", "model.layers.0")))


def reroute(tensors, p, n, slot, new):
    """tensors with token n's expert in `slot` of layer prefix p changed to `new`, its expert rows moved along
    (as an implementation that routed it there would write them)."""
    t = dict(tensors)
    ids = t[p + "topk_ids"] = tensors[p + "topk_ids"].clone()
    flat = ids.view(-1, ids.shape[-1])
    old, flat[n, slot] = int(flat[n, slot]), new
    for e, ids_before in ((old, tensors[p + "topk_ids"]), (new, tensors[p + "topk_ids"])):
        toks = (ids_before.reshape(len(flat), -1) == e).any(-1).nonzero().squeeze(1).tolist()
        rows = dict(zip(toks, tensors.get(f"{p}experts.{e}", torch.zeros(0, 1))))
        if e == old:
            rows.pop(n)
        else:
            rows.setdefault(n, tensors[f"{p}experts.{old}"][0])
        if rows:
            t[f"{p}experts.{e}"] = torch.stack([rows[k] for k in sorted(rows)])
    return t


def test_routing_flip_found_and_near_tie_excused(checkpoints):
    """A top-k choice changed on a decisive token is a divergence at that layer's topk_ids and token; the same
    change on a token whose k-th and (k+1)-th probabilities tie is reported, not failed, and that token's
    later rows are not compared (but an earlier token's are)."""
    model = ours(checkpoints("olmoe").path)
    ids = make_ids(1, 8)
    golden, header = golden_of(model, ids)
    name, gate = "model.layers.0.mlp.topk_ids", "model.layers.0.mlp.gate"
    probs = golden[gate].reshape(8, -1).softmax(-1).sort(-1, descending=True)
    n = int((probs.values[:, 1] - probs.values[:, 2]).argmax())  # the most decisive token
    theirs = reroute(golden, "model.layers.0.mlp.", n, 1, int(probs.indices[n, 2]))  # 2nd choice -> the 3rd
    _, first, _ = verify.compare(golden, theirs, header)
    assert first == (name, 0, n)
    # the same flip as a near-tie: make the golden 2nd and 3rd logits equal for that token
    golden[gate] = golden[gate].clone()
    g = golden[gate].view(8, -1)
    g[n, probs.indices[n, 2]] = g[n, probs.indices[n, 1]]
    theirs[gate] = golden[gate]
    theirs["model.layers.0"] = golden["model.layers.0"].clone()
    theirs["model.layers.0"][0, n] += 1.0  # the flipped token's residual: left out
    rows, first, _ = verify.compare(golden, theirs, header)
    assert first is None and any("near-tie" in r[3] for r in rows)
    if n > 0:
        theirs["model.layers.0"][0, n - 1] += 1.0  # an earlier token is still compared
        _, first, _ = verify.compare(golden, theirs, header)
        assert first == ("model.layers.0", 0, n - 1)


def test_rope_other_half_convention_found_at_q(checkpoints, monkeypatch):
    """transformers with RoPE rotating interleaved pairs (GPT-J) instead of halves diverges first at layer 0's q,
    at the first token with a non-zero angle (position 1)."""
    ck = checkpoints("mixtral")
    model = ours(ck.path)
    ids = make_ids(1, 8)
    golden, header = golden_of(model, ids)
    modeling = __import__(type(ck.hf).__module__, fromlist=["rotate_half"])

    def rotate_pairs(x):  # [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    monkeypatch.setattr(modeling, "rotate_half", rotate_pairs)
    with torch.no_grad():
        theirs = verify.collect(ck.hf, model.config, ids)
    _, first, _ = verify.compare(golden, theirs, header)
    assert first == ("model.layers.0.self_attn.q", 0, 1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_subcommand_passes(checkpoints, capsys, name):
    """transformers' eager forward agrees with ours on every recorded tensor, on all four model types."""
    code, text, err = run_cli(["hf", "--model", checkpoints(name).path, "--samples", 2, "--seq-len", 12], capsys)
    assert code == 0, text + err
    assert "no divergence" in text and "self_attn.q " in text and "mlp.experts.*" in text


def test_missing_tensors_listed_not_fatal(checkpoints, tmp_path, capsys):
    """theirs with only a few tensors: the others are listed as not compared, and the exit is 0."""
    model = ours(checkpoints("olmoe").path)
    golden, header = golden_of(model, make_ids(1, 6))
    gfile, tfile = tmp_path / "g.safetensors", tmp_path / "t.safetensors"
    verify.write_golden(str(gfile), golden, header)
    save_file({n: golden[n].contiguous() for n in ("input_ids", "model.embed_tokens", "lm_head")}, str(tfile))
    code, text, _ = run_cli(["compare", gfile, tfile], capsys)
    assert code == 0 and "not in" in text and "model.layers.0.self_attn.q" in text


def test_grad_of_adapter_tensors(checkpoints, tmp_path, capsys):
    """--grad records d loss / d every adapter tensor, equal to autograd's through the model's own (fast) path."""
    path = checkpoints("olmoe").path
    model = hub.load_model(str(path), dtype=torch.float32)
    config = methods.attach(model, "lora", r=4, alpha=8)
    with torch.no_grad():
        for n, p in methods.adapter_state(model).items():
            p.normal_(0, 0.05) if "B" in n.rsplit(".", 1)[-1] else None  # B != 0: every factor gets a gradient
    methods.save_adapter(model, tmp_path / "run", {**config, "base": dict(model_type=model.config.model_type,
                                                                       fingerprint=methods.fingerprint(model.config))})
    out = tmp_path / "g.safetensors"
    code, _, err = run_cli(["dump", "--model", path, "--adapter", tmp_path / "run", "--ids", "4 5 6 7 8 9", "--grad",
                            "--out", out], capsys)
    assert code == 0, err
    g, _ = verify.read_tensors(str(out))
    state = methods.adapter_state(model)
    ids = torch.tensor([[4, 5, 6, 7, 8, 9]])
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    assert set(g) >= {f"grad.{n}" for n in state} and any(".experts.adapter." in n for n in state)
    for n, p in state.items():  # loop and grouped paths differ by rounding only: forward and backward, 2 FORWARD
        assert_within(g[f"grad.{n}"], p.grad, 2 * FORWARD, msg=n)


def test_bad_input_named_without_traceback(checkpoints, tmp_path, capsys):
    """Missing file, a file that is not a golden file, ids outside the vocabulary: exit 2, the file or flag named,
    no traceback, nothing written."""
    path, out = checkpoints("olmoe").path, tmp_path / "g.safetensors"
    code, _, err = run_cli(["compare", tmp_path / "nope.safetensors", tmp_path / "x"], capsys)
    assert code == 2 and "nope.safetensors: file not found" in err and "Traceback" not in err
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    code, _, err = run_cli(["compare", plain, plain], capsys)
    assert code == 2 and "plain.safetensors: not a golden file" in err
    code, _, err = run_cli(["dump", "--model", path, "--ids", "1 2 999", "--out", out], capsys)
    assert code == 2 and "--ids" in err and not os.path.exists(out) and not os.listdir(tmp_path).count("g.safetensors")
    code, _, err = run_cli(["dump", "--model", tmp_path / "none", "--ids", "1 2", "--out", out], capsys)
    assert code == 2 and "none" in err and not os.path.exists(out)


def test_bf16_run_within_bf16_tolerance(checkpoints):
    """The same model run in bf16 passes against the fp32 golden: the tolerance follows the coarser run's dtype,
    also for the loss, which is computed in fp32 from bf16 logits."""
    path, ids = checkpoints("olmoe").path, make_ids(2, 8)
    golden, header = golden_of(ours(path), ids)
    theirs, _ = golden_of(ours(path, torch.bfloat16), ids)
    assert theirs["loss"].dtype == torch.float32 and theirs["lm_head"].dtype == torch.bfloat16
    rows, first, missing = verify.compare(golden, theirs, header)
    assert first is None and not missing, [r for r in rows if r[4]]
