"""The fast twins of moe.py's plain code: the same results in fewer passes over memory, or in less of it.

moe.py is the model written plainly; every module there that has a twin here checks its `plain` flag
(`model.set_plain(True)` sets it everywhere) and runs its plain code when it is set. Each twin below names its
plain twin and the test that proves the two equal (tests/test_fast.py; the whole model both ways against
transformers: tests/test_parity.py). This file imports no other file of the project (moe.py imports it).

- RMSNormFn: moe.RMSNorm's plain code as torch's fused norm (and its fused backward on CUDA).
- RoPEFn: moe.apply_rope (x * cos + rotate_half(x) * sin) without the negated copy and the cat.
- ExpertGroups, grouped_experts, SwiGLUFn, Unsort: moe.Experts.forward_loop (one expert at a time) as
  grouped matrix products over the (token, slot) pairs sorted by expert once per layer.
- chunked_cross_entropy_sum: moe.cross_entropy_sum's plain form, without (N, V) fp32 logits at once.
- grouped_mm: torch's grouped_mm itself, with exactly zero weight gradient for a group without rows.
The expert adapters' grouped products (LoRA on a subset of the experts, PERFT-E) are lora_fast.py's.

Shape letters: D hidden, I expert width, E experts, K top-k, N tokens, P (token, slot) pairs (N*K), V vocab.
What a GPU meets here that the CPU tests cannot show (grouped_mm's fast kernel only in bf16 on H100/B200-class
devices; Blackwell's empty-group gradients; the one host sync per MoE layer of an adapter on a subset of the
experts): notes/speed.md.
"""
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

_torch_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def can_group(*dims):
    """Whether grouped_mm can run on rows of these widths (it wants 16-byte aligned rows)."""
    return _torch_grouped_mm is not None and all(d % 8 == 0 for d in dims)


# ----------------------------------------------------------------------------- grouped_mm as torch has it, almost

def grouped_mm(x, w, offs):
    """torch's grouped_mm(x, w, offs=offs): the rows x (n, k), sorted by group, times w[g] (m, k, out) for
    the rows of group g (offs: the groups' int32 end rows). Where w needs a gradient, through GroupedMM,
    which gives a group without rows exactly zero gradient (see there); otherwise torch's op itself."""
    if torch.is_grad_enabled() and w.requires_grad:
        return GroupedMM.apply(x, w, offs)
    return _torch_grouped_mm(x, w, offs=offs)


class GroupedMM(torch.autograd.Function):
    """torch's grouped_mm with autograd's two gradient products, the weight's through group_weight_grad.
    Keeps x only if w needs its gradient and w only if x needs its own."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None, offs)
        ctx.w_transposed = w.stride(1) == 1  # w = W.transpose(1, 2) of a contiguous W, as the adapters pass B
        return _torch_grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, g):
        x, w, offs = ctx.saved_tensors
        dx = _torch_grouped_mm(g, w.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None  # (n, k)
        dw = None
        if ctx.needs_input_grad[1]:  # (m, k, out): x^T g per group, made in w's layout (no copy to match it later)
            dw = group_weight_grad(g, x, offs).transpose(1, 2) if ctx.w_transposed else group_weight_grad(x, g, offs)
        return dx, dw, None


def group_weight_grad(a, b, offs):
    """(m, p, q): a[rows of group j]^T @ b[rows of group j] for each group j, zero for a group without rows
    (a (n, p), b (n, q)): the gradient of a grouped product's weights.
    torch's grouped_mm should give that zero itself, and does on the CPU and on the fallback (an (k, 0) @
    (0, out) product); but on Blackwell (CUDA capability 10.x) its kernel returns wrong values for an empty
    group (pytorch issue 172439): an adapted expert that got no row in a batch would get a gradient from
    nothing, and Adam would move it. There, and in compiled code (no device query inside a graph), the
    empty groups are zeroed by a mask of the group sizes: exact whatever the kernel returned, NaN included,
    at the price of one more pass over the factor gradients (bench.py --traffic, OLMoE, r 16: 0.04 GiB more
    than a LoRA layer's 21.55, 0.2%; which is why it is not paid where the kernel is right)."""
    dw = _torch_grouped_mm(a.t(), b, offs=offs)
    if _empty_groups_unreliable(dw.device):
        sizes = torch.diff(offs, prepend=offs.new_zeros(1))  # (m,) rows per group, no host sync
        dw = torch.where(sizes[:, None, None] > 0, dw, 0)
    return dw


def _empty_groups_unreliable(device):
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


_warned_slow = False


def warn_if_slow(device, dtype):
    """Warn once per process when grouped_mm runs where torch has no fast kernel for it. torch's CUDA
    grouped_mm (GroupedBlas.cpp, as of torch 2.11) runs its CUTLASS kernel only when both inputs are bfloat16 on
    a device of capability 9.x or 10.x (H100/H200, B200); anything else (an A100, float32 on an H100)
    silently falls back to one matmul per group after copying offs to the host: a host sync on every call,
    4 per MoE layer per training step for the frozen experts and 12 more with expert LoRA. Only warned: the
    fallback still gives the right numbers. Not checked under torch.compile (inductor picks its own kernel)
    nor on ROCm (its rule is its own build's)."""
    global _warned_slow
    if _warned_slow or device.type != "cuda" or torch.version.hip or torch.compiler.is_compiling():
        return
    cap = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and cap[0] in (9, 10):
        return
    _warned_slow = True
    warnings.warn(f"moe_fast.grouped_mm: no fast kernel for {str(dtype).removeprefix('torch.')} on {device} "
                  f"(capability {cap[0]}.{cap[1]}): torch falls back to one matmul per expert with a host sync per "
                  "call; its fast kernel needs bfloat16 on capability 9.x or 10.x", stacklevel=3)


def _swiglu(gu):  # moe.swiglu (this file cannot import moe: moe imports it)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


# ----------------------------------------------------------------------------- norm, RoPE

class RMSNormFn(torch.autograd.Function):
    """moe.RMSNorm's plain code, weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype): the
    normalisation is torch's fused norm without a weight (one kernel on CUDA; fp32 inside, cast once: the
    plain result bit for bit), then the same separate multiply by the weight. The plain code makes ~5 passes
    over an fp32 copy of x forward and ~10 backward. The backward keeps x in its own dtype and the fp32 1/rms
    of each row (autograd would keep fp32 x) and is torch's fused kernel on CUDA; the same formula written
    out elsewhere. Tests: test_fast.py::test_rmsnorm_*."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n, r = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], None, eps)  # x's dtype; fp32 1/rms
        r = r.reshape(*x.shape[:-1], 1)
        ctx.save_for_backward(x, weight, r)
        return weight * n

    @staticmethod
    def backward(ctx, gy):
        x, weight, r = ctx.saved_tensors
        gw = None
        if ctx.needs_input_grad[1]:  # as autograd: gy * the normalised x in x's dtype, summed over the rows
            gw = (gy * (x.float() * r).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        gn = (gy * weight).to(x.dtype)  # through the scale, to the normalised x (x's dtype)
        if x.is_cuda:
            gx = torch.ops.aten._fused_rms_norm_backward(gn, x, [x.shape[-1]], r, None, [True, False])[0]
        else:  # d(h * r)/dh with h = x in fp32, r = 1/rms(h)
            h, gh = x.float() * r, gn.float()
            gx = (r * (gh - h * (gh * h).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class RoPEFn(torch.autograd.Function):
    """moe.apply_rope, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], with its roundings
    (each product, then the sum) but without the negated half and the cat: out = x * cos, then in place
    out1 -= x2 * sin1 and out2 += x1 * sin2. The backward has the same form (the rotation transposed):
    autograd's gradient bit for bit, in fewer passes. Test: test_fast.py::test_rope_bitwise."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return _rotate(g, cos, sin, inverse=True), None, None


def _rotate(x, cos, sin, inverse):
    (x1, x2), (s1, s2) = x.chunk(2, dim=-1), sin.chunk(2, dim=-1)
    out = x * cos
    o1, o2 = out.chunk(2, dim=-1)
    if inverse:  # [g1 c1 + g2 s2, g2 c2 - g1 s1]
        o1.add_(x2 * s2)
        o2.sub_(x1 * s1)
    else:  # [x1 c1 - x2 s1, x2 c2 + x1 s2]
        o1.sub_(x2 * s1)
        o2.add_(x1 * s2)
    return out


# ----------------------------------------------------------------------------- grouped experts

class ExpertGroups(NamedTuple):
    """The (token, slot) pairs of a whole layer sorted by expert once (`sort`): what grouped_experts and the
    expert adapters' grouped products (lora_fast.py) read."""
    order: torch.Tensor  # (P,) pair index (token * K + slot) of each sorted row
    token: torch.Tensor  # (P,) token of each sorted row
    expert: torch.Tensor  # (P,) expert of each sorted row (ascending)
    counts: torch.Tensor  # (E,) rows per expert
    offs: torch.Tensor  # (E,) int32 end offset of each expert's rows, as grouped_mm wants
    inverse: torch.Tensor  # (P,) sorted row of each pair: order's inverse permutation

    @staticmethod
    def sort(idx, E):
        flat = idx.reshape(-1)  # (P,)
        expert, order = torch.sort(flat, stable=True)
        # end offsets by binary search on the sorted ids: no host sync (CUDA bincount reads its max to the host)
        ends = torch.searchsorted(expert, torch.arange(E, device=flat.device, dtype=flat.dtype), right=True)
        counts = torch.diff(ends, prepend=ends.new_zeros(1))
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
        return ExpertGroups(order, order // idx.shape[1], expert, counts, ends.to(torch.int32), inverse)


def grouped_experts(x, idx, w, gate_up_proj, down_proj, adapter=None):
    """moe.Experts.forward_loop as grouped products: the pairs sorted by expert once, one grouped_mm for
    gate_up and one for down over all experts, back in (token, slot) order, weighted and summed as the loop.
    x (N, D), idx (N, K), w (N, K) -> (N, D). Tests: test_fast.py::test_grouped_experts_*,
    test_parity.py (the whole model both ways).

    An expert adapter (lora.ExpertLoRA, perft.ExpertAdapter) adds its updates through three grouped hooks,
    the fast twins of its plain gate_up / down (lora_fast.py has their bodies):
        work = adapter.grouped_prepare(groups, x)     once per layer: which sorted rows carry adapter work
        gu = adapter.grouped_gate_up(gu, xs, work)    gate_up_proj's output (P, 2I) + its update from xs (P, D)
        ys = adapter.grouped_down(ys, h, gu, xs, work)  down_proj's output (P, D) + its update
    They may add in place: gu and ys are grouped_mm outputs that nothing else holds."""
    N, K = idx.shape
    warn_if_slow(x.device, gate_up_proj.dtype)
    groups = ExpertGroups.sort(idx, gate_up_proj.shape[0])
    work = adapter.grouped_prepare(groups, x) if adapter is not None else None
    xs = x[groups.token]  # (P, D) token rows in expert order
    gu = stacked_mm(xs, gate_up_proj, groups.offs)  # (P, 2I)
    if adapter is not None:
        gu = adapter.grouped_gate_up(gu, xs, work)
    h = SwiGLUFn.apply(gu)  # (P, I) silu(g) * u, keeping gu only
    ys = stacked_mm(h, down_proj, groups.offs)  # (P, D)
    if adapter is not None:
        ys = adapter.grouped_down(ys, h, gu, xs, work)
    y = Unsort.apply(ys, groups).view(N, K, -1)  # (N, K, D) back in (token, slot) order
    return (y * w[..., None]).to(x.dtype).sum(dim=1)  # (N, D): weighted with the loop's rounding, summed over slots


def stacked_mm(x, w, offs):
    """The sorted rows of each expert g times w[g]^T, w stacked (E, out, in). A quantized w (quant.QuantWeight)
    dequantizes the whole stack for this product and again for the input's gradient (it keeps no copy)."""
    if hasattr(w, "grouped"):
        return w.grouped(x, offs, _torch_grouped_mm)
    return grouped_mm(x, w.transpose(1, 2), offs=offs)


class SwiGLUFn(torch.autograd.Function):
    """moe.swiglu(gu) = silu(g) * u with autograd's own backward ops, but keeping gu only (autograd keeps
    silu(g) too: another (rows, I)). Test: test_fast.py::test_swiglu_bitwise."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return _swiglu(gu)

    @staticmethod
    def backward(ctx, gh):
        gu = ctx.saved_tensors[0]
        g, u = gu.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # the compiler fuses the cat (and refuses out= into half a tensor)
            return torch.cat([torch.ops.aten.silu_backward(gh * u, g), gh * F.silu(g)], dim=-1)
        dgu = torch.empty_like(gu)  # eager: both halves written in place (a cat is one more pass over (rows, 2I))
        dg, du = dgu.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(gh * u, g, grad_input=dg)
        torch.mul(gh, F.silu(g), out=du)
        return dgu


class Unsort(torch.autograd.Function):
    """rows.index_select(0, groups.inverse): the layer's sorted rows back in (token, slot) order. A permutation's
    gradient is the gather by its inverse, `order`; autograd's index_select backward would instead zero a
    (P, D) tensor and scatter-add into it. Test: test_fast.py::test_unsort."""

    @staticmethod
    def forward(ctx, rows, groups):
        ctx.order = groups.order
        return rows.index_select(0, groups.inverse)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.order), None


# ----------------------------------------------------------------------------- loss

def chunked_cross_entropy_sum(head, h, labels, chunk=2048, ignore_index=-100):
    """moe.cross_entropy_sum's plain form (all (N, V) logits in fp32 at once), a chunk of rows at a time:
    each chunk's fp32 logits are made and, when training, recomputed in backward instead of kept. Equal up
    to the order of the fp32 sum. Test: test_fast.py::test_chunked_cross_entropy."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    ce = lambda hc, lc: F.cross_entropy(head(hc).float(), lc, ignore_index=ignore_index, reduction="sum")
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        hc, lc = h[i:i + chunk], labels[i:i + chunk]
        total = total + (torch.utils.checkpoint.checkpoint(ce, hc, lc, use_reentrant=False) if h.requires_grad else ce(hc, lc))
    return total
