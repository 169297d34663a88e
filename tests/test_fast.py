"""Every fast twin in moe_fast.py equals its plain twin in moe.py / lora.py, forward and backward.

fp32 comparisons: the twins compute the same formula with other groupings of the same fp32 operations, so
they agree to the roundings of their reductions, all of length <= 64 here (D = 48 or 64, 2I = 64, the <= 20
rows of one expert summed into its LoRA gradients): FP32_STEPS = 64 unit roundoffs u (2^-24) of the largest
value compared (conftest.assert_within). Where a twin claims bit-equality (RMSNorm forward in bf16, RoPE, SwiGLU
and its backward, Unsort) both sides run the same elementwise ops in the same order, or only move values, so the
claim holds on any CPU and the test asserts exact equality. Parity of the whole model in both modes with transformers:
test_parity.py::test_logits_match_hf.
"""
import pytest
import torch
import torch.nn.functional as F

import lora
import moe
from conftest import FORWARD, assert_within
from tiny import expert_layer_inputs, kept_for_backward, tiny_model
import methods
import moe_fast

FP32_STEPS = 64  # see the module docstring


def _grads(fn, *inputs, probe=None):
    """fn(*inputs) and the gradients of <fn(...), probe> w.r.t. each input (inputs cloned as leaves)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.dtype) if probe is None else probe
    out.backward(probe)
    return (out.detach(), *(t.grad for t in leaves))


# ----------------------------------------------------------------------------- norm, RoPE, SwiGLU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_plain_equals_fused(dtype):
    """moe.RMSNorm plain vs moe_fast.RMSNormFn: the forward bit for bit in bf16 (both normalise in fp32 and
    round once to bf16), to fp32 rounding in fp32; gradients of x and weight within the dtype's rounding."""
    g = torch.Generator().manual_seed(13)
    x = (3 * torch.randn(4, 7, 64, generator=g)).to(dtype)
    w = (0.8 + 0.4 * torch.rand(64, generator=g)).to(dtype)
    probe = torch.randn(4, 7, 64, generator=g).to(dtype)
    out = []
    for reference in (True, False):
        norm = moe.RMSNorm(64, 1e-5).to(dtype)
        norm.plain = reference
        with torch.no_grad():
            norm.weight.copy_(w)
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(probe)
        out.append((y.detach(), xi.grad, norm.weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = out
    if dtype == torch.bfloat16:  # torch's CPU fused norm runs the plain code's fp32 ops, then one cast
        assert torch.equal(y0, y1)
    assert_within(y1.float(), y0.float(), FP32_STEPS, msg="output")  # fp32: a mean over D = 64, grouped otherwise
    # the gradients' math in fp32 is the same up to grouping (sums of D = 64 or of 28 rows: FP32_STEPS); bf16:
    # that, then the bf16 product gy * w before it and one rounding of the result on each side: 4 u(bf16)
    steps = FP32_STEPS if dtype == torch.float32 else 4
    assert_within(gx1.float(), gx0.float(), steps, dtype, msg="x.grad")
    assert_within(gw1.float(), gw0.float(), steps, dtype, msg="weight.grad")


def test_rmsnorm_fused_backward_cuda_call_equals_cpu_formula():
    """The call the CUDA branch makes, _fused_rms_norm_backward(gn, x, [D], r, None, [True, False]), run as
    torch's reference decomposition of that kernel on the CPU, gives the written-out formula's gradient."""
    from torch._decomp.decompositions import _fused_rms_norm_backward

    g = torch.Generator().manual_seed(15)
    x = (3 * torch.randn(4, 7, 64, generator=g)).requires_grad_()
    gy = torch.randn(4, 7, 64, generator=g)
    moe_fast.RMSNormFn.apply(x, torch.ones(64), 1e-5).backward(gy)
    _, r = torch.ops.aten._fused_rms_norm(x.detach(), [64], None, 1e-5)
    ref = _fused_rms_norm_backward(gy, x.detach(), [64], r, None, [True, False])[0]
    assert_within(x.grad, ref, FP32_STEPS)  # the same formula, the mean over D = 64 grouped otherwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_bitwise(dtype):
    """moe_fast.RoPEFn equals moe.apply_rope's plain x * cos + rotate_half(x) * sin bit for bit, forward and
    backward (same products, same sums; only the negated copy and the cat are gone)."""
    g = torch.Generator().manual_seed(17)
    x = (3 * torch.randn(2, 5, 4, 16, generator=g)).to(dtype).transpose(1, 2)  # (B, H, T, S) as attention has it
    ang = torch.cat([torch.randn(2, 1, 5, 8, generator=g)] * 2, -1)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    plain = _grads(lambda x: moe.apply_rope(x, cos, sin, plain=True), x)
    fast = _grads(lambda x: moe.apply_rope(x, cos, sin, plain=False), x)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bitwise(dtype):
    """moe_fast.SwiGLUFn (keeps gu only, writes both gradient halves in place) equals moe.swiglu and its
    autograd gradient bit for bit."""
    gu = torch.randn(50, 64, generator=torch.Generator().manual_seed(16)).to(dtype)
    plain, fast = _grads(moe.swiglu, gu), _grads(moe_fast.SwiGLUFn.apply, gu)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))


def test_unsort():
    """moe_fast.Unsort equals index_select by the inverse permutation, and its gradient autograd's."""
    idx = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:2] for i in range(20)])
    groups = moe_fast.ExpertGroups.sort(idx, 8)
    rows = torch.randn(40, 16)
    plain = _grads(lambda r: r.index_select(0, groups.inverse), rows)
    fast = _grads(lambda r: moe_fast.Unsort.apply(r, groups), rows)
    assert all(torch.equal(a, b) for a, b in zip(plain, fast))
    assert torch.equal(groups.expert, idx.reshape(-1)[groups.order])  # sorted rows are the pairs by expert


# ----------------------------------------------------------------------------- experts and their LoRA

def _experts(ids=None, r=4, seed=0):
    E, D, I = 8, 48, 32
    experts = moe.Experts(E, D, I).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        experts.gate_up_proj.copy_(0.1 * torch.randn(E, 2 * I, D, generator=g))
        experts.down_proj.copy_(0.1 * torch.randn(E, D, I, generator=g))
    if ids is not None:
        experts.adapter = lora.ExpertLoRA(experts, ids, r, 2 * r)
        with torch.no_grad():
            for p in experts.adapter.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return experts


@pytest.mark.parametrize("ids", [None, [1, 5, 6], list(range(8))], ids=["frozen", "sieve", "all"])
def test_grouped_experts_equal_loop(ids):
    """moe_fast.grouped_experts (and ExpertLoRA's grouped products) equal moe.Experts.forward_loop (and
    ExpertLoRA's plain per-expert x @ A.T @ B.T * scale): output, input and routing-weight gradients, and
    the LoRA gradients. One expert (3) gets no rows: an empty group."""
    experts = _experts(ids)
    x, idx, w = expert_layer_inputs(40, 2, 8, 48)
    others = torch.tensor([0, 1, 2, 4, 5, 6, 7])  # no row for expert 3
    idx = torch.stack([others[torch.randperm(7, generator=torch.Generator().manual_seed(i))[:2]] for i in range(40)])
    res = {}
    for reference in (True, False):
        moe.set_plain(experts, reference)
        experts.zero_grad()
        y, gx, gw = _grads(lambda x, w: experts(x, idx, w), x, w)
        res[reference] = [y, gx, gw] + [p.grad for p in experts.parameters() if p.requires_grad]
    for i, (plain, fast) in enumerate(zip(res[True], res[False])):
        assert_within(fast, plain, FP32_STEPS, msg=f"output/gradient {i}:")
    assert len(res[True]) == (3 if ids is None else 9)


def test_the_experts_flag_picks_the_adapters_hooks(monkeypatch):
    """An expert adapter has no path flag of its own: set_plain on the model (before or after the adapter is
    attached) makes its experts run the plain loop, which calls only the adapter's plain hooks; the fast path
    calls only its grouped hooks."""
    m = tiny_model("olmoe")
    m.set_plain(True)
    methods.attach(m, "lora", r=4, alpha=8)
    calls = []
    for name in ("gate_up", "down", "grouped_prepare", "grouped_gate_up", "grouped_down"):
        real = getattr(lora.ExpertLoRA, name)
        monkeypatch.setattr(lora.ExpertLoRA, name, lambda self, *a, _n=name, _r=real: calls.append(_n) or _r(self, *a))
    ids = torch.randint(3, m.config.vocab_size, (2, 8))
    for plain in (True, False):
        m.set_plain(plain)
        calls.clear()
        m(ids)
        assert calls and all(c.startswith("grouped") != plain for c in calls), (plain, sorted(set(calls)))


def test_expert_layer_keeps_only_its_two_product_outputs():
    """Memory: for backward, a frozen expert layer on the fast path keeps the gate_up output (P, 2I) and the
    down output (P, D) (for the routing weights' gradient) and nothing else with a row per (token, slot)
    pair but the (P, 1) weights: not the gathered rows, not silu(gate), not a second copy of the down output."""
    N, K, E, D, I = 40, 2, 8, 48, 32
    experts = _experts()
    x, idx, w = expert_layer_inputs(N, K, E, D)
    y, kept = kept_for_backward(lambda: moe_fast.grouped_experts(x, idx, w, experts.gate_up_proj, experts.down_proj),
                                experts.gate_up_proj, experts.down_proj)
    P = N * K
    assert sorted(s for s in kept if s[0] == P) == [(P, 1), (P, D), (P, 2 * I)], kept
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and w.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- loss and the whole model

def test_chunked_cross_entropy_equals_plain():
    """moe_fast.chunked_cross_entropy_sum (chunks of 7 rows of 30, one label ignored) equals moe's plain
    cross_entropy_sum, the loss and the gradients of h and of the head (fp32 sums of ~30 terms of ~5)."""
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(2, 15, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (2, 15), generator=g)
    labels[0, 3] = -100
    plain = _grads(lambda h, W: moe.cross_entropy_sum(_Head(W, True), h, labels), h, W, probe=torch.tensor(1.0))
    fast = _grads(lambda h, W: moe_fast.chunked_cross_entropy_sum(lambda x: F.linear(x, W), h, labels, chunk=7), h, W,
                  probe=torch.tensor(1.0))
    for i, (a, b) in enumerate(zip(plain, fast)):  # the loss sums 29 terms, each a logsumexp over V = 50
        assert_within(b, a, FP32_STEPS, msg=f"loss/gradient {i}:")


class _Head:
    def __init__(self, W, reference):
        self.W, self.plain = W, reference

    def head(self, x):
        return F.linear(x, self.W)


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_whole_model_reference_equals_fast(model_type):
    """The whole step both ways: set_plain(True) (plain norms, RoPE, experts loop, plain expert LoRA,
    plain cross-entropy) equals the default fast twins: the loss and every adapter gradient."""
    m = tiny_model(model_type)
    methods.attach(m, "sieve", r=4, alpha=8, plan={0: [1, 5, 6], 1: [0, 7]})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in methods.adapter_state(m).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ids = torch.randint(3, 96, (3, 24), generator=g)
    res = {}
    for reference in (True, False):
        m.set_plain(reference)
        m.zero_grad()
        loss = m(ids, labels=ids)
        loss.backward()
        res[reference] = [loss.detach()] + [p.grad for p in methods.adapter_state(m).values()]
    for i, (plain, fast) in enumerate(zip(res[True], res[False])):
        # the loss: the forward (FORWARD, see conftest) and a sum of 69 terms; the gradients: the forward's
        # reductions again, transposed, in the backward: twice FORWARD
        assert_within(fast, plain, 2 * FORWARD, msg=f"loss/gradient {i}:")
