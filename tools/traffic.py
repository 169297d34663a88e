"""traffic.py: the bytes each op of one transformer layer moves in forward + backward, counted without a GPU
(`python -m tools.bench --traffic`).

An eager training step is bound by memory traffic in its many elementwise ops, and that traffic follows from
the shapes alone. So the transformer body is run on meta tensors in bf16 (no loss head, no optimizer) under a
dispatch mode that adds up, per (phase, aten op), the bytes of every tensor the op reads or returns: every
input and output counts once; views and allocations are free. Two ops are modelled by the CUDA kernels they
run there, not by what the meta device would run: sdpa as flash attention (read q, k, v, write o; backward
read q, k, v, o, dO, write dq, dk, dv) and RMSNorm's fused norm (read x, write the normalised x; backward read
dy, x, write dx). Matrix products are in the count but are compute-bound at these shapes. One layer is the
count of a 2-layer body minus that of a 1-layer body, so its backward also makes the gradient of its input,
and the embedding and the final norm cancel. Rows whose ops depend on values (`sieve` finds its rows with
nonzero; `dmep-pruned` prunes by measured utilization) cannot be counted.
"""
import collections

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from files import hub
import moe
import methods

FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "slice", "select", "unsqueeze",
        "squeeze", "split", "split_with_sizes", "chunk", "unbind", "alias", "detach", "as_strided", "lift_fresh",
        "empty", "empty_like", "new_empty", "empty_strided"}


class Traffic(TorchDispatchMode):
    """Adds up the bytes of every tensor an aten op reads or returns, per (phase, op)."""

    def __init__(self):
        super().__init__()
        self.phase, self.bytes = "fwd", collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in FREE:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.bytes[self.phase, func.overloadpacket.__name__] += sum(t.nbytes for t in tensors)
        return out


class FlashModel(torch.autograd.Function):
    """sdpa with flash attention's traffic."""

    @staticmethod
    def forward(ctx, q, k, v, counter):
        ctx.counter, ctx.qkv = counter, (q, k, v)  # meta tensors: kept for their shapes and strides only
        counter.bytes["fwd", "sdpa (flash)"] += q.nbytes + k.nbytes + v.nbytes + q.nbytes  # read q k v, write o
        return torch.empty_like(q)

    @staticmethod
    def backward(ctx, g):
        q, k, v = ctx.qkv
        ctx.counter.bytes["bwd", "sdpa (flash)"] += 2 * (q.nbytes + k.nbytes + v.nbytes) + 2 * g.nbytes  # read q k v o dO, write dq dk dv
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


class NormModel(torch.autograd.Function):
    """RMSNorm's fused CUDA kernels' traffic (moe_fast.RMSNormFn multiplies by the weight after it)."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        counter.bytes["fwd", "rms_norm (fused)"] += 2 * x.nbytes
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, g):
        ctx.counter.bytes["bwd", "rms_norm (fused)"] += 3 * g.nbytes
        return torch.empty_like(g), None


def count_layer(method, cdict, batch, seq, rank, alpha):
    """GiB one layer of `method` (a bench.py row) reads and writes: totals per phase and every (phase, op),
    biggest first."""
    if method.startswith("peft") or method in ("sieve", "dmep-pruned"):
        return dict(method=method, status="skipped: not countable on the meta device")
    one, two = (count_body(method, dict(cdict, num_hidden_layers=n), batch, seq, rank, alpha) for n in (1, 2))
    layer = {k: (two[k] - one[k]) / 2**30 for k in two if two[k] != one[k]}
    total = {ph: sum(v for (p, _), v in layer.items() if p == ph) for ph in ("fwd", "bwd")}
    return dict(method=method, status="ok", gib_per_layer=total,
                top=sorted(([f"{p} {op}", v] for (p, op), v in layer.items()), key=lambda kv: -kv[1]))


def count_body(method, cdict, batch, seq, rank, alpha):
    """Bytes by (phase, op) of one forward + backward of the body with `method`'s adapters, on meta tensors."""
    cfg = moe.Config.from_json(cdict)
    model = hub.build_empty(cfg, torch.bfloat16, "meta")
    methods.attach(model, method, rank, alpha)
    counter, sdpa, norm = Traffic(), F.scaled_dot_product_attention, moe.RMSNorm.forward
    F.scaled_dot_product_attention = lambda q, k, v, **kw: FlashModel.apply(q, k, v, counter)
    moe.RMSNorm.forward = lambda self, x: self.weight * NormModel.apply(x, counter)
    try:
        with counter:
            h = model.train()(torch.zeros(batch, seq, dtype=torch.long, device="meta"), hidden=True)
            counter.phase = "bwd"
            h.backward(torch.empty_like(h))
    finally:
        F.scaled_dot_product_attention, moe.RMSNorm.forward = sdpa, norm
    return counter.bytes


def format_rows(rows, top):
    out = []
    for r in rows:
        if r["status"] != "ok":
            out.append(f"{r['method']:<12} {r['status']}")
            continue
        t = r["gib_per_layer"]
        out.append(f"{r['method']:<12} fwd {t['fwd']:6.2f}  bwd {t['bwd']:6.2f}  total {t['fwd'] + t['bwd']:6.2f} GiB")
        out += [f"    {op:<40} {v:7.3f}" for op, v in r["top"][:top]]
    return "\n".join(out)
