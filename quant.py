"""A frozen base stored in 4 or 8 bits (QLoRA's NF4, or int8), dequantized where each product uses it.

NF4 (Dettmers et al., QLoRA 2023): the weight flattened, cut into blocks of 64 values; each block is divided by
its absmax (kept in fp32) and each value replaced by the nearest of 16 levels (NF4, the table below: quantiles of
a normal distribution, with an exact 0), a 4-bit code; two codes share a byte, the first in the high nibble.
Dequantized: level[code] * absmax, in fp32, then cast to the compute dtype. Double quant (--double-quant) stores
the absmax too in 8 bits: minus their mean, in blocks of 256 values, each scaled by its own fp32 absmax and
coded by bitsandbytes' 8-bit dynamic map. All of it is bitsandbytes' (0.50) quantize_4bit / dequantize_4bit
with blocksize 64, quant_type "nf4" (compress_statistics for double quant) bit for bit (tests/test_quant.py).
int8: one absmax per output row (the last dimension is the input), codes round(w * 127 / absmax).

What is kept: the codes and the scales (NF4 0.5 byte a weight + 4 bytes per 64, or 1 byte per 64 and a little
with double quant; int8 1 byte + 4 per row). No product keeps its dequantized weight for backward: the frozen
weight needs no gradient, and the input's gradient dequantizes it again (Frozen below); so the dequantized
weight is a transient of one product (one expert's on the plain loop, one layer's stacked experts on the fast
path). The router, the norms, the embeddings and lm_head are never quantized (routing is fragile; they are small).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("none", "nf4", "int8")
BLOCK, DQ_BLOCK = 64, 256
DEFAULT_SET = ("attn", "experts", "shared", "mlp")  # --quantize-set: which groups of weights are quantized
SETS = DEFAULT_SET

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")), fp32
NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)


class QuantError(ValueError):
    pass


def dynamic_map():
    """bitsandbytes' signed 8-bit dynamic map (functional.create_dynamic_map(True, 7, 8)): for exponent i of 7,
    2^i fraction levels, the midpoints of linspace(0.1, 1, 2^i + 1) times 10^(i-6), both signs; then 0 and 1,
    sorted. 254 + 2 = 256 values."""
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data), dtype=torch.float32)


def quantize_blocks(x, code, block, what="tensor", partial=False):
    """Each block of `block` values over the flattened x scaled by its absmax to [-1, 1] (times 1 / absmax), then
    coded by `code_of`. A last, shorter block is its own block where `partial` (double quant, as bitsandbytes),
    refused otherwise. -> codes (n,), absmax fp32 (blocks,)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    if n % block and not partial:
        raise QuantError(f"{what}: {n} values are not a multiple of the block of {block}")
    full = n - n % block
    absmax = flat[:full].view(-1, block).abs().max(dim=-1)[0]
    scaled = torch.clamp(flat[:full].view(-1, block) * (1.0 / absmax.view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        last = flat[full:].abs().max()
        absmax, scaled = torch.cat([absmax, last[None]]), torch.cat([scaled, torch.clamp(flat[full:] * (1.0 / last), -1, 1)])
    codes = code_of(torch.nan_to_num(scaled, nan=0.0), code.to(x.device))  # an all-zero block: 0 * inf
    if code.numel() > 16:  # bitsandbytes' 8-bit CPU kernel writes code 0 for an all-zero block
        codes = torch.where(torch.repeat_interleave(absmax == 0, block)[:n], 0, codes)
    return codes, absmax


def code_of(v, code):
    """The code of each v in [-1, 1]. 16 levels (NF4): the nearest level, a tie to the lower (bucketize on the
    midpoints), as bitsandbytes' quantize_4bit. 256 levels (its 8-bit dynamic map, double quant): as its CPU
    kernel, through a table of 65536 points evenly over [-1, 1], each given the nearest level, v taking the
    table's point nearest to it ((v + 1) / 2 * 65535, rounded)."""
    mid = (code[:-1] + code[1:]) / 2
    if code.numel() <= 16:
        return torch.bucketize(v, mid, out_int32=True)
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=v.device)) / 65535
    table = torch.searchsorted(mid, grid)  # levels whose midpoint is below each point
    return table[((v + 1.0) * 0.5 * 65535 + 0.5).to(torch.int64)]


def _scale(levels, absmax, block):  # levels (n,) * the absmax of their blocks (a last one may be short)
    n = levels.numel()
    full = n - n % block
    out = (levels[:full].view(-1, block) * absmax[:full // block].view(-1, 1)).reshape(-1)
    return out if full == n else torch.cat([out, levels[full:] * absmax[-1]])


def pack(codes):  # 4-bit codes (n,) -> bytes (n / 2,): the first of each pair in the high nibble
    c = codes.to(torch.uint8)
    return (c[::2] << 4) | c[1::2]


def unpack(packed):  # bytes (n / 2,) -> 4-bit codes (n,) as long
    out = torch.empty(packed.numel() * 2, dtype=torch.long, device=packed.device)
    out[::2], out[1::2] = packed >> 4, packed & 0xF
    return out


def nf4_quantize(w, what="weight"):
    """-> (packed codes uint8 (n/2,), absmax fp32 (n/64,))."""
    codes, absmax = quantize_blocks(w, NF4, BLOCK, what)
    return pack(codes), absmax


def nf4_dequantize(packed, absmax, shape, dtype):
    levels = torch.tensor(NF4.tolist(), device=packed.device)[unpack(packed)]  # (n,) fp32 (made here: fake tensors too)
    return (levels.view(-1, BLOCK) * absmax.view(-1, 1)).reshape(shape).to(dtype)


def double_quantize(absmax):
    """QLoRA's double quant of the fp32 absmax: (q uint8 (n,), their block absmax fp32 (n/256,), the mean)."""
    offset = absmax.mean()
    q, absmax2 = quantize_blocks(absmax - offset, dynamic_map(), DQ_BLOCK, partial=True)
    return q.to(torch.uint8), absmax2, offset


def double_dequantize(q, absmax2, offset):
    return _scale(dynamic_map().to(q.device)[q.long()], absmax2, DQ_BLOCK) + offset


def int8_quantize(w):
    """Per output row: absmax over the last dimension, codes round(w * 127 / absmax) (bitsandbytes'
    int8_vectorwise_quant's formula) -> (codes int8 w.shape, absmax fp32 w.shape[:-1])."""
    wf = w.float()
    absmax = wf.abs().amax(dim=-1)
    return torch.round(wf * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(-1)).to(torch.int8), absmax


def int8_dequantize(q, absmax, dtype):
    return (q.float() * (absmax / 127.0).unsqueeze(-1)).to(dtype)


# ----------------------------------------------------------------------------- the stored weight

class QuantWeight(nn.Module):
    """A frozen weight of `shape` (out, in), or stacked experts (E, out, in), stored as `kind` ("nf4", "int8")
    and dequantized to `dtype`. Its buffers are the whole stored form (state dict: codes, absmax and, with
    double quant, absmax2 and offset). Empty once built: `fill` or `set` it."""

    def __init__(self, shape, kind, dtype, double_quant=False, device=None, what="weight"):
        super().__init__()
        n = 1
        for s in shape:
            n *= s
        if kind == "nf4" and (n % BLOCK or (shape[0] > 1 and len(shape) == 3 and (n // shape[0]) % BLOCK)):
            raise QuantError(f"--quantize nf4: {what} of shape {tuple(shape)} ({n} values) is not a multiple of the "
                             f"block of {BLOCK} values (per expert for stacked experts)")
        self.shape, self.kind, self.dtype, self.double_quant, self.what = torch.Size(shape), kind, dtype, double_quant, what
        kw = dict(device=device)
        if kind == "nf4":
            self.register_buffer("codes", torch.empty(n // 2, dtype=torch.uint8, **kw))
            if double_quant:
                self.register_buffer("absmax", torch.empty(n // BLOCK, dtype=torch.uint8, **kw))
                self.register_buffer("absmax2", torch.empty(-(-n // BLOCK // DQ_BLOCK), dtype=torch.float32, **kw))
                self.register_buffer("offset", torch.empty((), dtype=torch.float32, **kw))
                self._staged = None  # fp32 absmax while pieces are filled, compressed by finish()
            else:
                self.register_buffer("absmax", torch.empty(n // BLOCK, dtype=torch.float32, **kw))
        elif kind == "int8":
            self.register_buffer("codes", torch.empty(shape, dtype=torch.int8, **kw))
            self.register_buffer("absmax", torch.empty(shape[:-1], dtype=torch.float32, **kw))
        else:
            raise QuantError(f"--quantize {kind}: not one of {', '.join(KINDS[1:])}")

    @property
    def device(self):
        return self.codes.device

    @torch.no_grad()
    def fill(self, t, index=None):
        """Quantize t into the place `index` names (None: all; (e,): expert e; (e, rows slice): part of it)."""
        flat_shape = self.shape
        lo, n = 0, t.numel()
        if index is not None:
            per = flat_shape[1:].numel()
            lo = index[0] * per + (index[1].start * flat_shape[-1] if len(index) > 1 else 0)
        if self.kind == "int8":
            q, a = int8_quantize(t)
            self.codes.view(-1, flat_shape[-1])[lo // flat_shape[-1]:(lo + n) // flat_shape[-1]] = q.view(-1, flat_shape[-1])
            self.absmax.view(-1)[lo // flat_shape[-1]:(lo + n) // flat_shape[-1]] = a.reshape(-1)
            return self
        if lo % BLOCK or n % BLOCK:
            raise QuantError(f"--quantize nf4: {self.what}: a piece of {n} values at {lo} does not align with the block of {BLOCK}")
        codes, absmax = nf4_quantize(t.to(self.device), self.what)
        self.codes[lo // 2:(lo + n) // 2] = codes
        if self.double_quant:
            if self._staged is None:
                self._staged = torch.zeros(self.shape.numel() // BLOCK, dtype=torch.float32, device=self.device)
            self._staged[lo // BLOCK:(lo + n) // BLOCK] = absmax
        else:
            self.absmax[lo // BLOCK:(lo + n) // BLOCK] = absmax
        return self

    @torch.no_grad()
    def finish(self):  # double quant: compress the absmax once every piece is in
        if self.kind == "nf4" and self.double_quant and self._staged is not None:
            self.absmax[:], self.absmax2[:], off = double_quantize(self._staged)
            self.offset.fill_(off)
            self._staged = None
        return self

    def scales(self):  # the fp32 absmax of the blocks (NF4) or of the rows (int8)
        if self.kind == "nf4" and self.double_quant:
            return double_dequantize(self.absmax, self.absmax2, self.offset)
        return self.absmax

    def dequantize(self, e=None):
        """The weight (or expert e's) in self.dtype: a fresh tensor, made again at each call."""
        if self.kind == "int8":
            q, a = (self.codes, self.absmax) if e is None else (self.codes[e], self.absmax[e])
            return int8_dequantize(q, a, self.dtype)
        scales, shape, codes = self.scales(), self.shape, self.codes
        if e is not None:
            per = shape[1:].numel()
            codes, scales, shape = codes[e * per // 2:(e + 1) * per // 2], scales[e * per // BLOCK:(e + 1) * per // BLOCK], shape[1:]
        return nf4_dequantize(codes, scales, shape, self.dtype)

    # ---- the products (moe.expert_linear, moe_fast's grouped products, QuantLinear)

    def linear(self, x, e=None, bias=None):  # x @ W^T (+ bias), W = self (or expert e)
        return Frozen.apply(x, lambda: self.dequantize(e), lambda x, w: F.linear(x, w, bias), lambda g, w: g @ w)

    def grouped(self, x, offs, grouped_mm):  # the rows of each group g times W[g]^T (stacked experts)
        return Frozen.apply(x, self.dequantize, lambda x, w: grouped_mm(x, w.transpose(1, 2), offs=offs),
                            lambda g, w: grouped_mm(g, w, offs=offs))

    def extra_repr(self):
        return f"{tuple(self.shape)}, {self.kind}{', double quant' if self.double_quant else ''}, -> {self.dtype}"


class Frozen(torch.autograd.Function):
    """fwd(x, W) with W = weight() a frozen weight dequantized for this product only: nothing of W is kept for
    backward, where the input's gradient bwd(g, W) dequantizes it again (QLoRA's recomputation)."""

    @staticmethod
    def forward(ctx, x, weight, fwd, bwd):
        ctx.weight, ctx.bwd = weight, bwd
        return fwd(x, weight())

    @staticmethod
    def backward(ctx, g):
        return ctx.bwd(g, ctx.weight()), None, None, None


class QuantLinear(nn.Module):
    """nn.Linear's place with its weight a QuantWeight (in_features, out_features and bias as nn.Linear's)."""

    def __init__(self, linear, kind, dtype, double_quant=False, what="weight"):
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        self.weight = QuantWeight(linear.weight.shape, kind, dtype, double_quant, linear.weight.device, what)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x):
        return self.weight.linear(x, bias=self.bias)


# ----------------------------------------------------------------------------- a model's quantized base

def targets(model, groups=DEFAULT_SET):
    """{parameter name in the model (checkpoint order) -> (parent module, attribute)} of the weights the groups
    quantize: "attn" q/k/v/o_proj, "experts" the stacked routed experts, "shared" Qwen2-MoE's shared expert,
    "mlp" the dense MLPs. Never the router, norms, embeddings, lm_head."""
    import moe  # not at the top: moe imports nothing of this file, and this file must not need moe to load
    out = {}
    for i, block in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        if "attn" in groups:
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{p}self_attn.{n}.weight"] = (block.self_attn, n)
        mlp = block.mlp
        if isinstance(mlp, moe.MoE):
            if "experts" in groups:
                for n in ("gate_up_proj", "down_proj"):
                    out[f"{p}mlp.experts.{n}"] = (mlp.experts, n)
            if "shared" in groups and hasattr(mlp, "shared_expert"):
                for n in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{p}mlp.shared_expert.{n}.weight"] = (mlp.shared_expert, n)
        elif "mlp" in groups:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{p}mlp.{n}.weight"] = (mlp, n)
    return out


def parse_set(text):
    groups = tuple(g for g in (text or "").split(",") if g)
    bad = [g for g in groups if g not in SETS]
    if bad or not groups:
        raise QuantError(f"--quantize-set {text!r}: each of a comma-separated list of {', '.join(SETS)}")
    return groups


def quantize(model, kind, dtype=None, double_quant=False, groups=DEFAULT_SET, fill=True):
    """Replace the weights of `groups` by QuantWeights of `kind` (nn.Linear by QuantLinear): fill=True quantizes
    the weights the model holds; fill=False leaves them empty (hub.load_model fills them from the shards, the
    memory model counts them). -> {parameter name: QuantWeight}. The model's other weights are untouched."""
    if kind in (None, "none"):
        return {}
    done = {}
    for name, (parent, attr) in targets(model, groups).items():
        cur = getattr(parent, attr)
        what = name
        if isinstance(cur, nn.Linear):
            q = QuantLinear(cur, kind, dtype or cur.weight.dtype, double_quant, what)
            if fill:
                q.weight.fill(cur.weight.detach()).finish()
            setattr(parent, attr, q)
            done[name] = q.weight
        else:
            q = QuantWeight(cur.shape, kind, dtype or cur.dtype, double_quant, cur.device, what)
            if fill:
                q.fill(cur.detach()).finish()
            delattr(parent, attr)
            setattr(parent, attr, q)
            done[name] = q
    model.quantization = dict(kind=kind, double_quant=double_quant, groups=list(groups), weights=sorted(done))
    return done


def describe(model):
    """What the adapter config records: None, or {kind, double_quant, groups, weights (count)}."""
    q = getattr(model, "quantization", None)
    return None if q is None else dict(q, weights=len(q["weights"]))
