"""The fast twins of the expert adapters' plain products: LoRA on a subset of a layer's experts (lora.ExpertLoRA)
and PERFT-E's adapter in every expert (perft.ExpertAdapter), as grouped matrix products over the layer's
(token, slot) rows sorted by expert (moe_fast.grouped_experts calls them through the adapter's grouped hooks).

Plainly (lora.py, perft.py) each adapted expert e adds x @ A_e^T @ B_e^T * scale to its own rows. Here all
adapted experts' products are one grouped_mm for A and one for B, on the rows routed to adapted experts only:
tokens routed to frozen experts do no LoRA work at all (MoE-Sieve's saving is real), and B A is never formed.
The A product's input rows are not kept for backward but gathered again there (RegatheredProduct).
Tests: tests/test_lora.py and tests/test_fast.py (grouped == the plain loop, values and gradients).

Shape letters: D hidden, I expert width, m adapted experts of a layer, r rank (rp: padded to a multiple of 8),
P sorted rows of the layer, n of them routed to adapted experts.
"""
import torch
import torch.nn.functional as F

import moe_fast

def grouped_lora_factors(A, B, scale, dt):
    """A and scale * B (scale folded into the small factor) in dtype dt, for the grouped products. grouped_mm
    wants 16-byte rows: the rank is padded to a multiple of 8 with zeros (exact: zero rows of A meet zero
    columns of B). A (m, r, in), B (m, out, r)."""
    A, B, pad = A.to(dt), (B * scale).to(dt), -A.shape[1] % 8
    return (A, B) if pad == 0 else (F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad)))


class RegatheredProduct(torch.autograd.Function):
    """z = grouped_mm(xr, A^T) (n, r), LoRA's A product, with its input rows xr (n, in) NOT kept for backward
    but made again there from a tensor that is kept anyway: xr = kept[rows], the layer input's rows (K copies
    of each token), or, with `swiglu`, xr = swiglu(kept[rows]), the down input made from the gate_up output
    that SwiGLUFn keeps (rows None: all rows). These rows are the largest things a LoRA step would keep
    per layer, for A's gradient alone; making them again costs one pass over them in backward. Plain twin:
    x @ A[e].T per expert (lora.ExpertLoRA's plain gate_up / down). Tests: test_lora.py (fast == loop)."""

    @staticmethod
    def forward(ctx, xr, A, offs, kept, rows, swiglu):  # A (m, r, in), offs (m,) group ends over the n rows
        ctx.save_for_backward(A, offs, kept, rows)
        ctx.swiglu = swiglu
        return moe_fast.grouped_mm(xr, A.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, dz):
        A, offs, kept, rows = ctx.saved_tensors
        xr = kept if rows is None else kept.index_select(0, rows)
        xr = moe_fast._swiglu(xr) if ctx.swiglu else xr
        dxr = moe_fast.grouped_mm(dz, A, offs=offs) if ctx.needs_input_grad[0] else None  # (n, in)
        dA = moe_fast.group_weight_grad(dz, xr, offs)  # (m, r, in): one product per expert, empty ones zero
        return dxr, dA, None, None, None, None


def a_product(dropout, xr, A, offs, kept, rows, swiglu=False):
    """An adapter's A product on the fast path, grouped_mm(dropout(xr), A^T) with xr = kept[rows] (or its
    swiglu): the rows are made again in backward, unless dropout is active (then autograd keeps them)."""
    if isinstance(dropout, torch.nn.Dropout) and dropout.training:
        return moe_fast.grouped_mm(dropout(xr), A.transpose(1, 2), offs=offs)
    return RegatheredProduct.apply(xr, A, offs, kept, rows, swiglu)


# ----------------------------------------------------------------------------- LoRA on a subset of the experts

def expert_lora_prepare(lora, g, x):
    """The rows of the layer's sorted rows (g, a moe_fast.ExpertGroups) that carry LoRA work: (rows, offs, x,
    token): the sorted rows routed to adapted experts, ascending (so still grouped by expert), the group ends of
    the adapted experts over those rows, the layer input x (N, D) and the token of each such row. rows None: every
    expert is adapted, all rows. None: no row reaches an adapted expert, no LoRA work in this layer.
    Finding the rows is one host sync per layer (nonzero): in exchange every LoRA tensor has those rows only
    (notes/speed.md, host syncs)."""
    if len(lora.ids) == lora.E:
        return None, g.offs, x, g.token
    rows = lora.adapted[g.expert].nonzero().squeeze(1)  # (n,)
    if rows.numel() == 0:
        return None
    offs = g.counts[lora.expert_ids].cumsum(0).to(torch.int32)  # (m,) ends, the last one n
    return rows, offs, x, g.token[rows]


def _add(base, y, rows):  # base[rows] += y in place (base is a grouped_mm output held by nothing else)
    # index_put_, not index_add_: autograd's index_add keeps its (rows, width) source for backward
    return base.add_(y) if rows is None else base.index_put_((rows,), y, accumulate=True)


def expert_lora_gate_up(lora, gu, x, work):
    """gu (P, 2I) += scale [B_g A_g x, B_u A_u x] on the rows of adapted experts; gate's and up's products in one
    (two A products under dropout: gate and up draw a mask each, as the plain hook and peft do)."""
    if lora.merged or work is None:
        return gu
    rows, offs, src, token = work
    gA, gB = grouped_lora_factors(lora.gate_A, lora.gate_B, lora.scale, x.dtype)
    uA, uB = grouped_lora_factors(lora.up_A, lora.up_B, lora.scale, x.dtype)
    rp = gA.shape[1]
    A = torch.cat([gA, uA], 1)  # (m, 2rp, D): gate's and up's A in one product
    B = torch.cat([F.pad(gB, (0, rp)), F.pad(uB, (rp, 0))], 1)  # (m, 2I, 2rp) block diagonal: one product writes [gate, up]
    xr = x if rows is None else x[rows]
    if isinstance(lora.dropout, torch.nn.Dropout) and lora.dropout.training:  # a mask for gate, another for up
        z = torch.cat([a_product(lora.dropout, xr, gA, offs, src, token), a_product(lora.dropout, xr, uA, offs, src, token)], -1)
    else:
        z = a_product(lora.dropout, xr, A, offs, src, token)  # (n, 2rp)
    return _add(gu, moe_fast.grouped_mm(z, B.transpose(1, 2), offs=offs), rows)


def expert_lora_down(lora, y, h, gu, work):
    """y (P, D) += scale B_d A_d h on the rows of adapted experts, h = swiglu(gu) (made again in backward from gu)."""
    if lora.merged or work is None:
        return y
    rows, offs = work[:2]
    A, B = grouped_lora_factors(lora.down_A, lora.down_B, lora.scale, h.dtype)
    z = a_product(lora.dropout, h if rows is None else h[rows], A, offs, gu, rows, swiglu=True)  # (n, rp)
    return _add(y, moe_fast.grouped_mm(z, B.transpose(1, 2), offs=offs), rows)


# ----------------------------------------------------------------------------- PERFT-E: an adapter in every expert

def expert_adapter_down(adapter, y, x, work):
    """y (P, D) += scale B_e act(A_e x) for every sorted row (its expert e), x (P, D) the rows' inputs;
    work = (offs, the layer input (N, D), the token of each row), so that x is gathered again in backward.
    act(0) = 0, so the rank padding stays exact."""
    offs, src, token = work
    A, B = grouped_lora_factors(adapter.A, adapter.B, adapter.scale, x.dtype)
    z = adapter.act(a_product(adapter.dropout, x, A, offs, src, token))  # (P, rp)
    return y.add_(moe_fast.grouped_mm(z, B.transpose(1, 2), offs=offs))
