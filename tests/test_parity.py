"""moe.py against Hugging Face transformers (eager attention, eager experts) on tiny random checkpoints.

Tolerances (conftest.py: counts of roundings times the unit roundoff u times the largest reference value):
fp32 logits within FORWARD = 256 u(fp32) of the largest logit (a few reductions of length <= 64 per layer, summed
in another order by each side); router logits and top-k weights likewise; bf16 fast vs loop within 6 u(bf16)
(see test_bf16_fast_matches_loop). Expert sets and greedy choices are compared exactly only where the gap that
decides them is far above those tolerances (conftest.assert_decisive).
"""

import dataclasses

import pytest
import torch
from conftest import (FORWARD, check_rmsnorm_backward, FP32_VARIANTS, VARIANTS, assert_decisive, assert_logits_close, assert_within, hf_topk,
                      load_hf, make_ids, read_json, write_json)
from safetensors import safe_open

from files import hub
import moe

ALL = list(VARIANTS)
# which layers are MoE layers, in order (Qwen2-MoE: layer 1 dense by mlp_only_layers; step2: only layer 1)
MOE_LAYERS = {"qwen2_moe": [0, 2], "qwen2_moe_step2": [1]}


def load_ours(ck, mode="fast"):
    """Our model in fp32 (a bf16 file is upcast, exactly, like HF's reference). mode "reference": the whole
    model on moe.py's plain code; "loop": only the experts; "fast": moe_fast.py's twins (the default)."""
    model = hub.load_model(ck.path, dtype=None if ck.file_dtype == torch.float32 else torch.float32)
    if mode == "reference":
        model.set_plain(True)
    else:
        model.set_expert_path(mode)
    return model


@torch.no_grad()
def hf_forward(hf, ids, mask=None):
    return hf(ids, attention_mask=mask, output_router_logits=True)


@pytest.mark.parametrize("mode", ["reference", "loop", "fast"])
@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_logits_match_hf(checkpoints, name, mode):
    """fp32 logits equal HF's eager forward: the whole model on the plain code, the fast twins with the
    experts' loop, and all fast twins (the default)."""
    ck = checkpoints(name)
    ids = make_ids(2, 12)
    ours = load_ours(ck, mode)(ids)
    assert ours.dtype == torch.float32
    assert_logits_close(ours, hf_forward(ck.hf, ids).logits)


@torch.no_grad()
def test_logit_tolerance_sees_a_small_expert_error(checkpoints):
    """The logit tolerance is tight enough to catch a real bug: one expert of the last layer with its down
    projection off by 1e-3 (relative) fails assert_logits_close against transformers."""
    ck = checkpoints("olmoe")
    model = load_ours(ck)
    model.model.layers[1].mlp.experts.down_proj[3] *= 1 + 1e-3
    ids = make_ids(2, 12)
    with pytest.raises(AssertionError):
        assert_logits_close(model(ids), hf_forward(ck.hf, ids).logits)


@pytest.mark.parametrize("name", ALL)
@torch.no_grad()
def test_routing_matches_hf(checkpoints, name):
    """Per MoE layer: router logits, top-k expert sets and their weights equal HF's."""
    ck = checkpoints(name)
    ids = make_ids(2, 12, seed=1)
    _, routing = load_ours(ck)(ids, return_routing=True)
    hf_logits = hf_forward(ck.hf, ids).router_logits
    K = ck.hf.config.num_experts_per_tok
    assert [r.layer for r in routing] == MOE_LAYERS.get(name, list(range(ck.hf.config.num_hidden_layers)))
    assert len(routing) == len(hf_logits)
    for r, ref in zip(routing, hf_logits):
        N, E = ref.shape
        assert r.logits.shape == (N, E) and r.topk_idx.shape == (N, K) and r.topk_w.shape == (N, K)
        assert r.topk_idx.dtype == torch.long
        # router logits come out of the same reductions as the logits (the layers below, then one of length D)
        assert_within(r.logits, ref, FORWARD, msg=f"router logits, layer {r.layer}:")
        # HF's router: softmax(fp32) over all experts, top-k, renormalise if norm_topk_prob (Mixtral: always)
        w_ref, idx_ref = hf_topk(ref, K)
        if getattr(ck.hf.config, "norm_topk_prob", True):
            w_ref = w_ref / w_ref.sum(-1, keepdim=True)
        # compare as dense (N, E) maps so slot order does not matter; sets must be identical
        dense = lambda idx, w: torch.zeros(N, E).scatter_(1, idx, w.float())
        assert_decisive(ref, K, FORWARD)  # so the sets below cannot differ by rounding alone
        assert torch.equal(dense(r.topk_idx, torch.ones(N, K)), dense(idx_ref, torch.ones(N, K)))
        # the weights (<= 1) follow from the logits: softmax's derivative is at most 1/2 and the renormalisation's
        # at most 2, so the logits' absolute error bounds theirs, plus a few roundings of softmax/renormalising
        logit_err = FORWARD * ref.abs().max().item()  # in u: the logits' bound above, as an absolute count
        assert_within(dense(r.topk_idx, r.topk_w), dense(idx_ref, w_ref), logit_err + 16, magnitude=1, msg="weights:")


@pytest.mark.parametrize("name", ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe"])
@torch.no_grad()
def test_fast_equals_loop_fp32(checkpoints, name):
    """In fp32 the grouped_mm expert path equals the per-expert loop: the same products, summed in blocks of
    another size by grouped_mm than by the loop's matmuls, then the same model around them (FORWARD)."""
    ck = checkpoints(name)
    model = load_ours(ck)
    ids = make_ids(3, 16, seed=2)
    model.set_expert_path("loop")
    loop, r_loop = model(ids, return_routing=True)
    model.set_expert_path("fast")
    fast, r_fast = model(ids, return_routing=True)
    assert_logits_close(fast, loop)
    for a, b in zip(r_loop, r_fast):
        assert_decisive(a.logits, a.topk_idx.shape[1], FORWARD)  # the later layers' inputs differ by rounding
        assert torch.equal(a.topk_idx, b.topk_idx)


@pytest.mark.parametrize("name", ["mixtral_bf16", "olmoe"])
@torch.no_grad()
def test_bf16_fast_matches_loop(checkpoints, name):
    """In bf16 the fast path equals the loop within 6 u(bf16) = 2.3e-2 of the logit scale, routing identical in
    layer 0: the expert outputs are rounded to bf16 at different points (grouped_mm's output vs the loop's per
    expert output and its index_add), a few roundings of values below the residual stream's size, carried to
    the logits through the later layers and the head, each of which rounds its output once more."""
    ck = checkpoints(name)
    model = hub.load_model(ck.path, dtype=torch.bfloat16)
    ids = make_ids(2, 16, seed=3)
    model.set_expert_path("loop")
    loop, r_loop = model(ids, return_routing=True)
    model.set_expert_path("fast")
    fast, r_fast = model(ids, return_routing=True)
    assert fast.dtype == torch.bfloat16
    # layer 0's routing reads the same input on both paths; later layers may flip at near-ties in bf16
    assert torch.equal(r_loop[0].topk_idx, r_fast[0].topk_idx)
    assert_logits_close(fast.float(), loop.float(), steps=6, dtype=torch.bfloat16)


@torch.no_grad()
def test_bf16_file_loads_as_bf16(checkpoints):
    """dtype=None takes the dtype from the file: a bf16 checkpoint gives bf16 parameters and logits."""
    ck = checkpoints("mixtral_bf16")
    model = hub.load_model(ck.path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(make_ids(1, 8)).dtype == torch.bfloat16


@torch.no_grad()
def test_bf16_close_to_hf_bf16(checkpoints):
    """A bf16 model (ours) stays close to HF's bf16 eager model: 90% same argmax, median |diff| < 0.05."""
    ck = checkpoints("mixtral_bf16")
    hf = load_hf(ck.path, dtype=torch.bfloat16)
    ids = make_ids(2, 16, seed=4)
    ref = hf(ids).logits.float()
    ours = hub.load_model(ck.path)(ids).float()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (ours - ref).abs().median() < 0.05


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
@torch.no_grad()
def test_topk_weight_dtype_follows_hf(checkpoints, name):
    """In a bf16 model the top-k weights are fp32 for Mixtral (HF v5 keeps them fp32), bf16 for OLMoE/Qwen."""
    ck = checkpoints(name)
    model = hub.load_model(ck.path, dtype=torch.bfloat16)
    _, routing = model(make_ids(1, 8), return_routing=True)
    expected = torch.float32 if name == "mixtral" else torch.bfloat16
    assert routing[0].topk_w.dtype == expected
    assert routing[0].logits.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", ["reference", "fast"])
@pytest.mark.parametrize("name", FP32_VARIANTS)
@torch.no_grad()
def test_right_padding_matches_hf(checkpoints, name, mode):
    """With a right-padded attention_mask, logits on real tokens equal HF's with the same mask."""
    ck = checkpoints(name)
    ids = make_ids(3, 10, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ours = load_ours(ck, mode)(ids, attention_mask=mask)
    ref = hf_forward(ck.hf, ids, mask).logits
    real = mask.bool()
    assert_logits_close(ours[real], ref[real])


@torch.no_grad()
def test_clip_qkv_is_active(checkpoints):
    """The OLMoE fixture's clip_qkv really clips: HF logits change by > 0.1 when it is turned off."""
    ck = checkpoints("olmoe")
    ids = make_ids(2, 12)
    unclipped = load_hf(ck.path, clip_qkv=None)
    assert ck.hf.config.clip_qkv is not None and unclipped.config.clip_qkv is None
    assert (unclipped(ids).logits - ck.hf(ids).logits).abs().max() > 0.1


def test_tied_checkpoint_has_no_lm_head(checkpoints):
    """The tied-embedding fixture has no lm_head.weight on disk (the loader must use the embedding)."""
    ck = checkpoints("qwen3_moe")
    assert read_json(ck.path / "config.json")["tie_word_embeddings"] is True
    with safe_open(ck.path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()


def test_sharded_checkpoint_has_index(checkpoints):
    """The sharded fixture is really sharded: an index json and more than one safetensors file."""
    ck = checkpoints("olmoe_norm_sharded")
    index = read_json(ck.path / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1
    assert not (ck.path / "model.safetensors").exists()


def v4_spelling(cfg):
    """Rewrite a transformers-5 config.json the way v4 / hub files spell it."""
    cfg = dict(cfg)
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    if "num_local_experts" in cfg and cfg["model_type"] != "mixtral":  # Qwen3-MoE hub files say num_experts
        cfg["num_experts"] = cfg.pop("num_local_experts")
    if cfg["num_key_value_heads"] == cfg["num_attention_heads"]:
        del cfg["num_key_value_heads"]  # absent means MHA
    if cfg.get("head_dim", 0) is None:
        del cfg["head_dim"]  # absent or null means hidden / heads
    return cfg


@pytest.mark.parametrize("name", ["olmoe_norm_sharded", "mixtral", "qwen3_moe"])
@torch.no_grad()
def test_v4_config_spelling_matches_hf(checkpoints, ckpt_copy, name):
    """A config.json in v4 spelling (rope_theta, torch_dtype, num_experts, no kv heads) gives HF's logits."""
    ck = checkpoints(name)
    path = ckpt_copy(name)
    write_json(path / "config.json", v4_spelling(read_json(path / "config.json")))
    ids = make_ids(2, 12)
    assert_logits_close(hub.load_model(path)(ids), hf_forward(ck.hf, ids).logits)


def test_config_from_dict_equals_from_file(checkpoints):
    """Config.from_json gives the same frozen config from a path and from the parsed dict."""
    ck = checkpoints("qwen2_moe")
    a = hub.read_config(ck.path)
    b = moe.Config.from_json(read_json(ck.path / "config.json"))
    assert a == b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.hidden_size = 1


def test_load_model_is_eval(checkpoints):
    """load_model returns a model in eval mode."""
    assert not hub.load_model(checkpoints("olmoe").path).training


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_bitwise_equals_hf(dtype):
    """moe.apply_rope, plain and fast (moe_fast.RoPEFn: no negated copy, no cat), gives HF's apply_rotary_pos_emb
    and its autograd gradient bit for bit,
    on q and k laid out as attention has them ((B, T, H, S) transposed to (B, H, T, S), cos/sin (B, 1, T, S))."""
    from transformers.models.olmoe.modeling_olmoe import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(17)
    q = (3 * torch.randn(2, 5, 4, 16, generator=g)).to(dtype).transpose(1, 2)
    k = (3 * torch.randn(2, 5, 2, 16, generator=g)).to(dtype).transpose(1, 2)
    ang = torch.randn(2, 5, 8, generator=g)
    cos, sin = torch.cat((ang, ang), -1).cos().to(dtype), torch.cat((ang, ang), -1).sin().to(dtype)
    gq, gk = torch.randn(q.shape, generator=g).to(dtype), torch.randn(k.shape, generator=g).to(dtype)
    results = []
    plain = lambda ref: lambda q, k: (moe.apply_rope(q, cos[:, None], sin[:, None], ref), moe.apply_rope(k, cos[:, None], sin[:, None], ref))
    for rope in (plain(True), plain(False), lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)):
        qi, ki = q.detach().requires_grad_(), k.detach().requires_grad_()
        qo, ko = rope(qi, ki)
        torch.autograd.backward((qo, ko), (gq, gk))
        results.append((qo, ko, qi.grad, ki.grad))
    for plain_, fast, ref in zip(*results):
        assert torch.equal(plain_, ref) and torch.equal(fast, ref)


@pytest.mark.parametrize("reference", [True, False])
@torch.no_grad()
def test_rmsnorm_bf16_bitwise_equals_hf(reference):
    """In bf16, RMSNorm (plain and fused) equals HF's bit for bit (normalise in fp32, cast back, then scale)."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeRMSNorm

    g = torch.Generator().manual_seed(13)
    x = (3 * torch.randn(4, 7, 64, generator=g)).bfloat16()
    w = (0.8 + 0.4 * torch.rand(64, generator=g)).bfloat16()
    ours, ref = moe.RMSNorm(64, 1e-5).bfloat16(), OlmoeRMSNorm(64, eps=1e-5).bfloat16()
    ours.plain = reference
    ours.weight.copy_(w)
    ref.weight.copy_(w)
    assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_backward_equals_hf_autograd(dtype):
    """RMSNorm's hand-written backward (it keeps x, not fp32 x) gives autograd's gradients through HF's
    RMSNorm, for x and for a trainable weight: to fp32 rounding in fp32, within bf16 rounding in bf16.
    (On CUDA the backward is torch's fused kernel: tests/test_gpu.py runs the same check there.)"""
    check_rmsnorm_backward(dtype, "cpu")


