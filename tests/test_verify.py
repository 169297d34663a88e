"""verify.py: golden tensors agree with themselves and with transformers; compare recomputes each tensor the way
moe.py does, names a planted difference at the layer, tensor and token where it is made, judges routing as sets
of (expert, weight) pairs with near-ties in logit units, and refuses (exit 2) what it cannot compare."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from files import hub
import methods
import moe
from tools import verify
from tools import verify_compare
from tools import verify_forced
from tools import verify_schema
from conftest import FORWARD, VARIANTS, NoGradWatch, assert_logits_close, assert_no_graph, assert_within, make_ids


def ours(path, dtype=torch.float32):
    model = hub.load_model(str(path), dtype=dtype)
    model.set_plain(True)
    return model


def golden_of(model, ids, grad=False):
    t = verify.collect(model, model.config, ids, grad=grad)
    return t, verify.make_header(t, model.config)


def compare(golden, theirs, header, model, dtype=torch.float32):  # model: the reference (its weights in dtype)
    return verify_compare.compare(golden, theirs, header, model, dtype)


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
    assert code == 0 and "no divergence" in text, text


def test_tensors_in_schema_order_and_described(checkpoints):
    """Every recorded tensor is in the schema, and the file lists them in the schema's order for this model (the
    order moe.py's forward makes them, shared expert included), so `verify names` is the file's own order."""
    model = ours(checkpoints("qwen2_moe").path)
    _, header = golden_of(model, make_ids(1, 6))
    order = [n for n, *_ in verify_schema.names_of(model.config)]
    names = [e["name"] for e in header["tensors"]]
    assert set(names) <= set(order) and "model.layers.0.mlp.shared_expert_gate" in names
    assert names == sorted(names, key=order.index)
    assert all(isinstance(e["what"], str) for e in header["tensors"])


def test_names_lists_the_schema_as_text_and_json(checkpoints, capsys):
    """`verify names` gives every name with shape, dtype and meaning; with --model, every name of that model (its
    layers, experts and sizes), the dense layer without a router."""
    code, text, _ = run_cli(["names", "--json"], capsys)
    rows = json.loads(text)["tensors"]
    assert code == 0 and {"model.layers.<i>.self_attn.q", "model.layers.<i>.mlp.experts.<e>", "loss"} <= {r["name"] for r in rows}
    assert all(r["shape"] and r["dtype"] and r["meaning"] for r in rows)
    code, text, _ = run_cli(["names", "--model", checkpoints("qwen2_moe").path], capsys)
    assert code == 0 and "model.layers.2.mlp.experts.7 " in text and "(B, T, 4, 16)" in text
    assert "model.layers.1.mlp.gate" not in text and "model.layers.1.mlp " in text


def test_reference_recomputed_op_by_op_is_moe_py(checkpoints):
    """With nothing of theirs put in, compare's reference (verify_forced, moe.py's ops split at every name, in
    fp64 for an fp32 run) gives moe.py's golden tensors: the two differ by fp32 rounding only."""
    model = ours(checkpoints("qwen2_moe").path)
    ids = make_ids(2, 8)
    golden, _ = golden_of(model, ids)
    seen = {}

    class Record:  # a judge that keeps the exact values and puts nothing in
        def tensor(self, name, v, **_):
            seen[name] = v.exact
            return v

        def routing(self, prefix, logits, route):
            w, idx = route(logits.exact)
            seen[prefix + "topk_ids"] = idx
            return idx, self.tensor(prefix + "topk_weights", verify_forced.Value(w, route(logits.rounded, idx)[0],
                                                                                  logits.taint))

        def experts(self, prefix, e, tok, v):
            return self.tensor(f"{prefix}experts.{e}", v)

        def experts_done(self, prefix, tokens):
            pass

    verify_forced.forward(model, ids, torch.float32, Record())
    assert set(golden) - {"input_ids", "attention_mask"} <= set(seen)
    for name, g in golden.items():
        if name in seen and g.is_floating_point():
            assert_within(seen[name].reshape(g.shape), g, FORWARD, msg=name)
        elif name in seen:
            assert torch.equal(seen[name].reshape(g.shape), g), name


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
    """One expert's weights scaled by 1 + 1e-4: the first divergence is that expert's rows, in that layer; after
    them only the weighted sum (computed from the reference's rows) fails: each later tensor is judged from theirs."""
    model = ours(checkpoints("olmoe").path)
    ids = make_ids(2, 8)
    golden, header = golden_of(model, ids)
    e = int(golden["model.layers.1.mlp.topk_ids"].reshape(-1)[5])  # an expert some token uses
    bad = ours(checkpoints("olmoe").path)
    with torch.no_grad():
        bad.model.layers[1].mlp.experts.down_proj[e] *= 1 + 1e-4
    rows, first, missing, unknown = compare(golden, golden_of(bad, ids)[0], header, model)
    assert first[:2] == (f"model.layers.1.mlp.experts.{e}", 1) and not missing and not unknown
    assert [r.name for r in rows if r.failed] == [f"model.layers.1.mlp.experts.{e}", "model.layers.1.mlp.experts"]


def tie_router(model, layer, n):
    """Edit layer's router so that token n's 2nd and 3rd experts get equal logits; returns them (a, b)."""
    ids = make_ids(1, 8)
    h = golden_of(model, ids)[0][f"model.layers.{layer}.post_attention_layernorm"].reshape(8, -1)[n].double()
    W = model.model.layers[layer].mlp.gate.weight
    top = (W.double() @ h).topk(3).indices.tolist()
    a, b = top[1], top[2]
    with torch.no_grad():
        W[b] = (W[b].double() + (W[a].double() - W[b].double()) @ h * h / (h @ h)).float()
    return a, b


def flipped_route(n, a, b, calls=1):
    """moe.route, but on its first `calls` calls token n takes expert b for a (or a for b): another choice."""
    plain, count = moe.route, []

    def route(logits, k, renorm):
        w, idx = plain(logits, k, renorm)
        count.append(1)
        if len(count) <= calls:
            probs = torch.softmax(logits.float(), -1)
            idx = idx.clone()
            idx[n] = torch.where(idx[n] == a, b, torch.where(idx[n] == b, a, idx[n]))
            w = probs.gather(-1, idx)
            w = w / w.sum(-1, keepdim=True) if renorm else w
        return w, idx
    return route


def test_routing_near_tie_excused_and_decisive_flip_named(checkpoints, monkeypatch):
    """Top-k sets are judged against the router logits in logit units: a different expert on a token whose 2nd and
    3rd logits tie is excused and listed apart; on a decisive token it is the divergence, at topk_ids and that
    token. Without their routing, the tie's token is excused downstream, and the loss is still judged."""
    model, n = ours(checkpoints("olmoe").path), 3
    a, b = tie_router(model, 0, n)
    ids = make_ids(1, 8)
    golden, header = golden_of(model, ids)
    monkeypatch.setattr(moe, "route", flipped_route(n, a, b))
    theirs = golden_of(model, ids)[0]  # the whole run made with the other choice at the tie
    rows, first, _, _ = compare(golden, theirs, header, model)
    assert first is None and "near-tie flip(s) excused" in next(r.note for r in rows if r.name.endswith("0.mlp.topk_ids"))
    layer0 = {n: t for n, t in theirs.items() if not n.startswith("model.layers.0.mlp")}  # routing not recorded
    rows, first, _, _ = compare(golden, layer0, header, model)
    assert first is None and "excused (routing not recorded" in next(r.note for r in rows if r.name == "model.layers.0")
    assert next(r for r in rows if r.name == "loss").ratio > 0  # judged, from their logits
    probs = golden["model.layers.0.mlp.gate"].reshape(8, -1).softmax(-1).sort(-1, descending=True)
    m = int((probs.values[:, 1] - probs.values[:, 2]).argmax())  # the most decisive token
    monkeypatch.setattr(moe, "route", flipped_route(m, int(probs.indices[m, 1]), int(probs.indices[m, 2])))
    _, first, _, _ = compare(golden, golden_of(model, ids)[0], header, model)
    assert first == ("model.layers.0.mlp.topk_ids", 0, m)


def test_topk_compared_as_pairs_in_any_order(checkpoints, monkeypatch):
    """Each token's (expert, weight) pairs listed in another slot order pass; weights moved to other experts fail
    at topk_weights. A run routing every token elsewhere (experts' token sets disjoint from the golden's): a
    verdict at topk_ids, not a crash."""
    model = ours(checkpoints("olmoe").path)
    golden, header = golden_of(model, make_ids(2, 8))
    p, theirs = "model.layers.0.mlp.", dict(golden)
    theirs[p + "topk_ids"], theirs[p + "topk_weights"] = golden[p + "topk_ids"].flip(-1), golden[p + "topk_weights"].flip(-1)
    assert compare(golden, theirs, header, model)[1] is None
    theirs[p + "topk_weights"] = golden[p + "topk_weights"]  # the pairs broken: weight k with id K-1-k
    assert compare(golden, theirs, header, model)[1][:2] == (p + "topk_weights", 0)
    plain = moe.route
    monkeypatch.setattr(moe, "route", lambda logits, k, renorm: (lambda w, i: (w, (i + 1) % 8))(*plain(logits, k, renorm)))
    theirs = golden_of(model, make_ids(2, 8))[0]  # every token elsewhere, its expert rows from there
    assert compare(golden, theirs, header, model)[1] == (p + "topk_ids", 0, 0)


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
    assert compare(golden, theirs, header, model)[1] == ("model.layers.0.self_attn.q", 0, 1)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_hf_subcommand_passes(checkpoints, capsys, name):
    """transformers' eager forward agrees with ours on every recorded tensor, on all model types; in bf16 too."""
    for dtype in ("float32", "bfloat16") if name in ("olmoe", "qwen2_moe") else ("float32",):
        code, text, err = run_cli(["hf", "--model", checkpoints(name).path, "--random-ids", 2, "--seq-len", 12,
                                   "--dtype", dtype], capsys)
        assert code == 0, text + err
        assert "no divergence" in text and "self_attn.q " in text and "mlp.experts.*" in text


def test_bf16_run_passes_and_a_small_error_is_caught(checkpoints):
    """The same model run in bf16 (plain and fast paths) passes against the fp32 golden; in fp32 an error of 1e-3
    in one tensor is named, in bf16 one of 3%."""
    path, ids = checkpoints("olmoe").path, make_ids(2, 8)
    golden, header = golden_of(ours(path), ids)
    bf16 = ours(path, torch.bfloat16)
    theirs, _ = golden_of(bf16, ids)
    assert theirs["loss"].dtype == torch.float32 and theirs["lm_head"].dtype == torch.bfloat16
    rows, first, missing, _ = compare(golden, theirs, header, bf16, torch.bfloat16)
    assert first is None and not missing, [r for r in rows if r.failed]
    upcast = {n: t.float() if t.is_floating_point() else t for n, t in theirs.items()}
    assert verify.run_dtype(upcast, None, None)[0] == torch.bfloat16  # bf16 values saved as fp32: a bf16 run
    bf16.set_plain(False)
    assert compare(golden, golden_of(bf16, ids)[0], header, bf16, torch.bfloat16)[1] is None
    for dtype, theirs, scale in ((torch.float32, golden, 1 + 1e-3), (torch.bfloat16, theirs, 1.03)):
        bad = dict(theirs, **{"model.layers.1.self_attn": theirs["model.layers.1.self_attn"] * scale})
        ref = ours(path, dtype)
        assert compare(golden, bad, header, ref, dtype)[1][:2] == ("model.layers.1.self_attn", 1)


def test_fewer_expert_rows_name_the_dropped_token(checkpoints):
    """An expert with one row fewer than the tokens routed to it (a capacity limit) names that token."""
    model = ours(checkpoints("olmoe").path)
    golden, header = golden_of(model, make_ids(2, 8))
    name = next(n for n in golden if ".mlp.experts." in n and len(golden[n]) >= 3)
    theirs = dict(golden, **{name: torch.cat([golden[name][:1], golden[name][2:]])})
    idx = golden[name.rsplit(".experts.", 1)[0] + ".topk_ids"].reshape(16, -1)
    token = int((idx == int(name.rsplit(".", 1)[1])).any(-1).nonzero()[1])
    rows, first, _, _ = compare(golden, theirs, header, model)
    assert first[0] == name and first[2] == token
    assert "dropped" in next(r.note for r in rows if r.failed)


def test_compare_verdicts_and_exit_status(checkpoints, tmp_path, capsys):
    """A few tensors: exit 0 and the rest listed as not recorded; NaN: exit 1; their own names only, other input
    ids, a wrong shape: exit 2 with the reason, never a traceback."""
    model = ours(checkpoints("olmoe").path)
    golden, header = golden_of(model, make_ids(1, 6))
    header["model"] = str(checkpoints("olmoe").path)
    gfile, tfile = tmp_path / "g.safetensors", tmp_path / "t.safetensors"
    verify.write_golden(str(gfile), golden, header)

    def verdict(tensors):
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(tfile))
        return run_cli(["compare", gfile, tfile], capsys)

    code, text, _ = verdict({n: golden[n] for n in ("input_ids", "model.embed_tokens", "lm_head")})
    assert code == 0 and "not recorded" in text and "model.layers.0.self_attn.q" in text
    nan = golden["model.layers.1.self_attn"].clone()
    nan[0, 2] = float("nan")
    code, text, _ = verdict(dict(golden, **{"model.layers.1.self_attn": nan}))
    assert code == 1 and "layer 1, model.layers.1.self_attn, token (b0, t2): not finite (nan)" in text
    for tensors, reason in (({"input_ids": golden["input_ids"], "h.0.attn": golden["lm_head"]}, "none of its 2 names"),
                            (dict(golden, input_ids=golden["input_ids"] + 1), "other ids"),
                            (dict(golden, **{"model.layers.0.self_attn.q": golden["model.layers.0.self_attn.q"].transpose(1, 2)}),
                             "model.layers.0.self_attn.q: shape (1, 4, 6, 16), expected")):
        code, text, err = verdict(tensors)
        assert code == 2 and reason in err and "Traceback" not in err, err


def test_grad_of_adapter_tensors(checkpoints, tmp_path, capsys):
    """--grad records d loss / d every adapter tensor, equal to autograd's through the model's own (fast) path,
    and only those: the base stays frozen."""
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
    assert {n[5:] for n in g if n.startswith("grad.")} == set(state) and any(".experts.adapter." in n for n in state)
    for n, p in state.items():  # loop and grouped paths differ by rounding only: forward and backward, 2 FORWARD
        assert_within(g[f"grad.{n}"], p.grad, 2 * FORWARD, msg=n)
    code, text, _ = run_cli(["compare", out, out], capsys)
    assert code == 0 and "grad." in text


def test_dump_runs_without_autograd(checkpoints, monkeypatch, tmp_path, capsys):
    """dump builds no graph even when the base's parameters require gradients: every module forward runs with
    gradients disabled and no recorded tensor keeps a graph; --random-ids N gives N fixed sequences."""
    model = hub.load_model(str(checkpoints("olmoe").path))
    model.requires_grad_(True)
    with NoGradWatch(model) as watch:
        tensors = verify.collect(model, model.config, make_ids(2, 6))
    watch.check()
    assert_no_graph(tensors)
    monkeypatch.setattr(hub, "load_model", lambda *a, **k: model)  # the CLI's model: parameters requiring grad
    out = tmp_path / "g.safetensors"
    with NoGradWatch(model) as watch:
        code, text, err = run_cli(["dump", "--model", checkpoints("olmoe").path, "--random-ids", 3, "--seq-len", 5,
                                   "--out", out], capsys)
    watch.check()
    assert code == 0 and "3 x 5 tokens" in text, err


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
