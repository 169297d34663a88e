"""A Mixture-of-Experts decoder (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) in plain PyTorch.

It loads hub checkpoints straight from config.json + *.safetensors and gives the logits of Hugging Face
transformers' eager forward (DESIGN.md §2). The experts of a layer are stored stacked, and run either
as the obvious loop over experts (the reference, as in mistral's moe.py) or as grouped matrix products
over the (token, slot) pairs sorted by expert once per layer (the fast path). A test proves them equal.

Shape letters: B batch, T time, D hidden, H query heads, G kv heads, S head size, E experts, K top-k,
I expert width, N tokens (B*T), P (token, slot) pairs (N*K), V vocabulary.
"""
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

MODEL_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")
_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


class ConfigError(ValueError):
    pass


class CheckpointError(ValueError):
    pass


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (Qwen dense layers); the expert width of OLMoE and Mixtral
    moe_intermediate_size: int  # routed expert width
    shared_expert_intermediate_size: int  # 0 = no shared expert (all but Qwen2-MoE)
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool  # renormalise the top-k weights to sum to 1 (Mixtral: always)
    topk_weights_fp32: bool  # Mixtral (transformers v5) keeps the top-k weights in fp32, others cast to the model dtype
    decoder_sparse_step: int
    mlp_only_layers: tuple
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    attention_bias: bool  # bias on q, k, v and o (OLMoE, Qwen3-MoE)
    qkv_bias: bool  # bias on q, k, v only (Qwen2-MoE)
    qk_norm: str  # "" none, "full": RMSNorm over all heads (OLMoE), "head": per head (Qwen3-MoE)
    clip_qkv: float | None
    tie_word_embeddings: bool
    router_aux_loss_coef: float
    torch_dtype: str
    pad_token_id: int | None
    bos_token_id: int | None
    eos_token_id: int | None

    def is_moe_layer(self, i):
        # Qwen's rule; OLMoE and Mixtral have step 1 and no mlp_only_layers, so every layer is MoE.
        return i not in self.mlp_only_layers and self.num_experts > 0 and (i + 1) % self.decoder_sparse_step == 0

    def fingerprint(self):
        """A short hash of the architecture (adapters record it to refuse another base); the storage dtype
        and the aux-loss coefficient are left out: they do not change what an adapter applies to."""
        arch = {k: v for k, v in asdict(self).items() if k not in ("torch_dtype", "router_aux_loss_coef")}
        return hashlib.sha256(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:16]

    @staticmethod
    def from_json(src):
        """Fill from a config.json path (file or directory) or an already parsed dict (v4 or v5 keys)."""
        where = "config dict"
        if not isinstance(src, dict):
            where = os.path.join(src, "config.json") if os.path.isdir(src) else str(src)
            if not os.path.isfile(where):
                raise ConfigError(f"{where}: config.json not found")
            try:
                with open(where) as f:
                    src = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(src, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(src).__name__}")
        try:
            cfg = Config._parse(src, where)
        except KeyError as e:
            raise ConfigError(f"{where}: required key {e} is missing") from None
        except TypeError as e:
            raise ConfigError(f"{where}: a value has the wrong type ({e})") from None
        for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok"):
            v = getattr(cfg, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: {k} = {v!r} is not a positive integer")
        if cfg.num_experts_per_tok > cfg.num_experts:
            raise ConfigError(f"{where}: num_experts_per_tok {cfg.num_experts_per_tok} > {cfg.num_experts} experts")
        return cfg

    @staticmethod
    def _parse(c, where):
        mt = c.get("model_type")
        if mt not in MODEL_TYPES:
            raise ConfigError(f"{where}: model_type {mt!r} is not implemented (supported: {', '.join(MODEL_TYPES)})")
        if c.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{where}: hidden_act {c['hidden_act']!r} is not implemented (only silu)")
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"{where}: rope_type {rope_type!r} is not implemented (only default RoPE)")
        theta = rope.get("rope_theta", c.get("rope_theta", 1e6 if mt == "mixtral" else 1e4))
        sliding = c.get("use_sliding_window", False) if mt.startswith("qwen") else c.get("sliding_window") is not None
        if sliding or "sliding_attention" in (c.get("layer_types") or []):
            raise ConfigError(f"{where}: sliding-window attention is active; it is not implemented")
        heads = c["num_attention_heads"]
        experts = c.get("num_experts", c.get("num_local_experts"))
        qwen = mt.startswith("qwen")
        eos = c.get("eos_token_id")
        return Config(
            model_type=mt,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"] if qwen else c["intermediate_size"],
            shared_expert_intermediate_size=c.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
            num_experts=experts,
            num_experts_per_tok=c["num_experts_per_tok"],
            norm_topk_prob=True if mt == "mixtral" else bool(c.get("norm_topk_prob", False)),
            topk_weights_fp32=mt == "mixtral",
            decoder_sparse_step=c.get("decoder_sparse_step", 1) if qwen else 1,
            mlp_only_layers=tuple(c.get("mlp_only_layers") or ()) if qwen else (),
            rms_norm_eps=c.get("rms_norm_eps", 1e-5 if mt in ("olmoe", "mixtral") else 1e-6),
            rope_theta=float(theta),
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            attention_bias=bool(c.get("attention_bias", False)) if mt in ("olmoe", "qwen3_moe") else False,
            qkv_bias=bool(c.get("qkv_bias", True)) if mt == "qwen2_moe" else False,
            qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(mt, ""),
            clip_qkv=c.get("clip_qkv") if mt == "olmoe" else None,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            router_aux_loss_coef=c.get("router_aux_loss_coef", 0.01 if mt == "olmoe" else 0.001),
            torch_dtype=c.get("dtype") or c.get("torch_dtype") or "float32",
            pad_token_id=c.get("pad_token_id"),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return RMSNormFn.apply(x, self.weight, self.eps)


class RMSNormFn(torch.autograd.Function):
    """HF's RMSNorm, weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype). The normalisation is
    torch's fused norm without a weight (one kernel on CUDA; fp32 inside, cast once: HF's result bit for bit),
    then HF's separate multiply by the weight. Eager HF makes ~5 passes over an fp32 copy of x forward and
    ~10 backward, for each of a layer's two to four norms. The backward keeps x in its own dtype and the fp32
    1/rms of each row (autograd would keep fp32 x) and is torch's fused kernel on CUDA, where it has one; the
    same formula written out elsewhere."""

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


def rope_inv_freq(cfg):
    S = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, S, 2, dtype=torch.float) / S))  # (S/2,) fp32, on the CPU as HF


class RoPEFn(torch.autograd.Function):
    """HF's RoPE, x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1], with HF's roundings (each
    product, then the sum) and without the negated half and the cat: out = x * cos, then in place
    out1 -= x2 * sin1 and out2 += x1 * sin2. The backward has the same form (the rotation transposed):
    autograd's gradient bit for bit, in fewer passes."""

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


class MLP(nn.Module):
    """A dense SwiGLU MLP: Qwen's dense layers and shared expert."""

    def __init__(self, D, width):
        super().__init__()
        self.gate_proj = nn.Linear(D, width, bias=False)
        self.up_proj = nn.Linear(D, width, bias=False)
        self.down_proj = nn.Linear(width, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.H, self.G, self.S = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        D, qkv_bias = cfg.hidden_size, cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(D, self.H * self.S, bias=qkv_bias)
        self.k_proj = nn.Linear(D, self.G * self.S, bias=qkv_bias)
        self.v_proj = nn.Linear(D, self.G * self.S, bias=qkv_bias)
        self.o_proj = nn.Linear(self.H * self.S, D, bias=cfg.attention_bias)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.H * self.S, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.G * self.S, cfg.rms_norm_eps)
        elif cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.S, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.S, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":  # OLMoE: over the whole projection, before splitting into heads
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.H, self.S)
        k = k.view(B, T, self.G, self.S)
        if self.qk_norm == "head":  # Qwen3-MoE: per head, over S
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, S), (B, G, T, S)
        v = v.view(B, T, self.G, self.S).transpose(1, 2)  # (B, G, T, S)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, S)
        q, k = RoPEFn.apply(q, cos, sin), RoPEFn.apply(k, cos, sin)  # HF: x * cos + rotate_half(x) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, G, T_past + T, S)
        # GQA: each kv head serves H/G consecutive query heads (enable_gqa = repeat_interleave semantics)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=self.S ** -0.5, enable_gqa=self.G != self.H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.H * self.S))


class Routing(NamedTuple):
    logits: torch.Tensor  # (N, E) router logits, model dtype
    topk_idx: torch.Tensor  # (N, K) chosen experts
    topk_w: torch.Tensor  # (N, K) their weights (fp32 for Mixtral, else the model dtype)
    layer: int | None = None  # set by Transformer.body, outside the block: torch.compile specialises a
    # graph on every Python int it reads, so a block that read its own index would compile once per layer


def route(logits, cfg):
    """HF's top-k router: softmax in fp32 over all experts, top-k, optional renormalisation."""
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    w, idx = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)  # (N, K)
    if cfg.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return (w if cfg.topk_weights_fp32 else w.to(logits.dtype)), idx


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2I, D) = [gate; up], down_proj (E, D, I).

    `adapter` (set by lora.py, None here) adds its updates inside the expert computation:
    `gate_up(gu, x, at)` returns gate_up_proj's output gu (rows, 2I) plus its update from the expert input x,
    `down(y, h, gu, x, at)` down_proj's output y (rows, D) plus its update from h = swiglu(gu) or from x.
    `at` is the expert id in the loop path; in the fast path, what `adapter.prepare(groups, x)` made of the
    layer's sorted rows and input (N, D) once (so the adapter can work on the rows of its own experts only,
    and make its input rows again in backward instead of keeping them), and the adapter may add in place.
    """

    def __init__(self, E, D, I):
        super().__init__()
        self.E, self.I = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        aligned = D % 8 == 0 and I % 8 == 0  # grouped_mm wants 16-byte aligned rows
        self.path = "fast" if _grouped_mm is not None and aligned else "loop"
        self.adapter = None

    def forward(self, x, idx, w):  # x (N, D), idx (N, K), w (N, K) -> (N, D)
        return self.forward_fast(x, idx, w) if self.path == "fast" else self.forward_loop(x, idx, w)

    def forward_loop(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in range(self.E):
            slot, tok = torch.where(idx.T == e)  # HF's order: by slot, then token
            if tok.numel() == 0:
                continue
            xe = x[tok]  # (n, D)
            gu = F.linear(xe, self.gate_up_proj[e])  # (n, 2I)
            if self.adapter is not None:
                gu = self.adapter.gate_up(gu, xe, e)
            h = swiglu(gu)  # (n, I)
            y = F.linear(h, self.down_proj[e])  # (n, D)
            if self.adapter is not None:
                y = self.adapter.down(y, h, gu, xe, e)
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))
        return out

    def forward_fast(self, x, idx, w):
        N, K = idx.shape
        groups = ExpertGroups.sort(idx, self.E)
        at = self.adapter.prepare(groups, x) if self.adapter is not None else None
        xs = x[groups.token]  # (P, D) token rows in expert order
        gu = _grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=groups.offs)  # (P, 2I)
        if self.adapter is not None:
            gu = self.adapter.gate_up(gu, xs, at)
        h = SwiGLUFn.apply(gu)  # (P, I) silu(g) * u, keeping gu only
        ys = _grouped_mm(h, self.down_proj.transpose(1, 2), offs=groups.offs)  # (P, D)
        if self.adapter is not None:
            ys = self.adapter.down(ys, h, gu, xs, at)
        y = Unsort.apply(ys, groups).view(N, K, -1)  # (N, K, D) back in (token, slot) order
        return (y * w[..., None]).to(x.dtype).sum(dim=1)  # (N, D): weighted as HF (its rounding), summed over slots


def swiglu(gu):  # gu = [g, u] (rows, 2I) -> silu(g) * u (rows, I)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


class SwiGLUFn(torch.autograd.Function):
    """swiglu(gu), with autograd's own backward ops, but keeping gu only (autograd keeps silu(g) too:
    another (rows, I))."""

    @staticmethod
    def forward(ctx, gu):
        ctx.save_for_backward(gu)
        return swiglu(gu)

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
    (P, D) tensor and scatter-add into it (index_copy_ forward would keep the rows for backward)."""

    @staticmethod
    def forward(ctx, rows, groups):
        ctx.order = groups.order
        return rows.index_select(0, groups.inverse)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.order), None


class ExpertGroups(NamedTuple):
    """The (token, slot) pairs of a layer sorted by expert once; reused by every product of the layer."""
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


class MoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's sigmoid-gated shared expert), reading h (N, D).
    `adapter` (lora.py's PERFT adapters, None here) runs beside the whole block: y += adapter(h)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.gate = nn.Linear(D, cfg.num_experts, bias=False)  # the router
        self.experts = Experts(cfg.num_experts, D, cfg.moe_intermediate_size)
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(D, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)
        self.adapter = None

    def forward(self, x):  # x (B, T, D)
        h = x.reshape(-1, x.shape[-1])  # (N, D)
        logits = self.gate(h)  # (N, E)
        w, idx = route(logits, self.cfg)
        y = self.experts(h, idx, w)
        if self.cfg.shared_expert_intermediate_size:
            y = y + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if self.adapter is not None:
            y = y + self.adapter(h)
        return y.view_as(x), Routing(logits, idx, w)


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, routing = self.mlp(h)
            return x + y, routing
        return x + self.mlp(h), None


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # names mirror the checkpoint: model.layers.0.self_attn.q_proj.weight
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpoint = False  # recompute each block in the backward pass (train.py --grad-checkpoint)

    def set_expert_path(self, path):
        assert path in ("fast", "loop"), path
        if path == "fast" and _grouped_mm is None:
            raise RuntimeError("this torch has no grouped_mm; only the loop expert path is available")
        for m in self.modules():
            if isinstance(m, Experts):
                m.path = path

    def body(self, input_ids, attention_mask=None, position_ids=None, cache=None):
        """Final-normed hidden states (B, T, D) and the routing of every MoE layer."""
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # (B, T, S/2) fp32
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)  # (B, T, S)
        mask = None  # None: plain causal attention (sdpa's fast path)
        if attention_mask is not None or cache is not None:
            mask = attention_mask_4d(attention_mask, B, T, past, x.device)
        routing = []
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpoint and self.training:
                x, r = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x, r = block(x, cos, sin, mask, cache)
            if r is not None:
                routing.append(r._replace(layer=i))
        if cache is not None:
            cache.pos += T
        return self.model.norm(x), routing

    def head(self, h):
        return F.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, return_routing=False,
                labels=None, hidden=False):
        """Logits (B, T, V). With `labels`: the summed cross-entropy instead (see cross_entropy_sum);
        with `hidden`: the final hidden states. With return_routing also the routing of every MoE layer.
        (Everything goes through forward, so FSDP2's hooks gather the root's weights for the head too.)"""
        h, routing = self.body(input_ids, attention_mask, position_ids, cache)
        out = h if hidden else self.head(h) if labels is None else cross_entropy_sum(self, h, labels)
        return (out, routing) if return_routing else out


def cross_entropy_sum(model, h, labels, chunk=2048, ignore_index=-100):
    """Sum of next-token losses over the labelled positions, without keeping (N, V) fp32 logits: each
    chunk's logits are made in fp32 and, when training, recomputed in backward instead of stored."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    ce = lambda hc, lc: F.cross_entropy(model.head(hc).float(), lc, ignore_index=ignore_index, reduction="sum")
    total = 0.0
    for i in range(0, h.shape[0], chunk):
        hc, lc = h[i:i + chunk], labels[i:i + chunk]
        total = total + (torch.utils.checkpoint.checkpoint(ce, hc, lc, use_reentrant=False) if h.requires_grad else ce(hc, lc))
    return total


def attention_mask_4d(attention_mask, B, T, past, device):
    """Boolean (B, 1, T, past+T) mask: causal, padding keys hidden. Each token always sees itself, so the
    rows of padding queries are never empty (an empty row would give NaN and spread through the values)."""
    q = torch.arange(past, past + T, device=device)[:, None]  # (T, 1) query positions
    kpos = torch.arange(past + T, device=device)[None, :]  # (1, Tk)
    mask = (kpos <= q)[None, None]  # (1, 1, T, Tk)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]
    return mask | (kpos == q)[None, None]


# ----------------------------------------------------------------------------- losses

def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None, all_sum=None):
    """transformers' load_balancing_loss_func: E * sum_e f_e * P_e, pooled over all layers; padding masked.
    f_e: share of (token, slot) assignments to e; P_e: mean router probability of e. Uniform routing gives k.
    all_sum (torchrun: parallel.all_sum): f_e and the token count become global, P_e keeps this rank's sum,
    so the ranks' terms and their gradients add up to the loss and gradient of the whole batch."""
    counts, probs, rows = 0.0, 0.0, 0.0
    m = None if attention_mask is None else attention_mask.reshape(-1).float()  # (N,)
    for logits in router_logits:  # (N, E) per layer
        p = F.softmax(logits.float(), dim=-1)
        _, sel = torch.topk(p, top_k, dim=-1)  # (N, K)
        onehot = F.one_hot(sel, num_experts).float().sum(1)  # (N, E) assignments per token
        if m is not None:
            onehot, p = onehot * m[:, None], p * m[:, None]
        counts, probs = counts + onehot.sum(0), probs + p.sum(0)
        rows = rows + (p.shape[0] if m is None else m.sum())
    if all_sum is not None:
        counts, rows = all_sum(counts.detach()), all_sum(torch.as_tensor(rows, dtype=torch.float32, device=counts.device))
    return num_experts * torch.sum((counts / rows) * (probs / rows))


def load_balancing_loss_per_layer(router_logits, num_experts, top_k, attention_mask=None, all_sum=None):
    """The same loss computed per layer and averaged (each layer balanced on its own)."""
    losses = [load_balancing_loss([lg], num_experts, top_k, attention_mask, all_sum) for lg in router_logits]
    return torch.stack(losses).mean()


def router_z_loss(router_logits, attention_mask=None, all_sum=None):
    """mean over tokens and layers of logsumexp(logits)^2 (ST-MoE; OLMoE pretrained with coef 0.001).
    all_sum (torchrun): divide by the global token count, so the ranks' terms add up to the batch's mean."""
    z = torch.stack([torch.logsumexp(lg.float(), dim=-1).pow(2) for lg in router_logits])  # (L, N)
    m = torch.ones(z.shape[1], device=z.device) if attention_mask is None else attention_mask.reshape(-1).float()
    rows = m.sum() if all_sum is None else all_sum(m.sum())
    return (z * m).sum() / (rows * z.shape[0])


# ----------------------------------------------------------------------------- loading

def checkpoint_names(cfg):
    """The one explicit map: on-disk tensor name -> (our parameter name, index into it or None)."""
    names = {"model.embed_tokens.weight": ("model.embed_tokens.weight", None), "model.norm.weight": ("model.norm.weight", None)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", None)
    I = cfg.moe_intermediate_size
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        own = [f"{p}input_layernorm.weight", f"{p}post_attention_layernorm.weight"]
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            own.append(f"{p}self_attn.{proj}.weight")
            if cfg.attention_bias or (cfg.qkv_bias and proj != "o_proj"):
                own.append(f"{p}self_attn.{proj}.bias")
        if cfg.qk_norm:
            own += [f"{p}self_attn.q_norm.weight", f"{p}self_attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            own += [f"{p}mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
        elif cfg.model_type == "mixtral":  # block_sparse_moe.experts.E.w1 (gate), w3 (up), w2 (down)
            names[f"{p}block_sparse_moe.gate.weight"] = (f"{p}mlp.gate.weight", None)
            for e in range(cfg.num_experts):
                q = f"{p}block_sparse_moe.experts.{e}."
                names[q + "w1.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(0, I)))
                names[q + "w3.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(I, 2 * I)))
                names[q + "w2.weight"] = (f"{p}mlp.experts.down_proj", (e,))
        else:
            own.append(f"{p}mlp.gate.weight")
            for e in range(cfg.num_experts):
                q = f"{p}mlp.experts.{e}."
                names[q + "gate_proj.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(0, I)))
                names[q + "up_proj.weight"] = (f"{p}mlp.experts.gate_up_proj", (e, slice(I, 2 * I)))
                names[q + "down_proj.weight"] = (f"{p}mlp.experts.down_proj", (e,))
            if cfg.shared_expert_intermediate_size:
                own += [f"{p}mlp.shared_expert.{w}_proj.weight" for w in ("gate", "up", "down")]
                own.append(f"{p}mlp.shared_expert_gate.weight")
        names.update({n: (n, None) for n in own})
    return names


def checkpoint_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = [os.path.join(path, f) for f in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
    else:
        files = [os.path.join(path, "model.safetensors")]
    for f in files:
        if not os.path.isfile(f):
            raise CheckpointError(f"{f}: checkpoint file not found")
    return files


def pick_device(name=None):
    """The device a script's --device names (None: cuda if available, else cpu); a clear error for a name
    torch does not know or a CUDA device on a machine without one."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    return device


def load_model(path, dtype=None, device=None, shard=None):
    """Build on the meta device, then fill tensor by tensor from the safetensors straight onto `device`
    (host memory peaks at about one tensor). Strict: every tensor present, none left over, shapes checked.
    dtype None: the dtype of the embedding tensor in the file. `shard(model)` runs on the meta model
    before it is materialised (parallel.py: FSDP2); each rank then copies only the rows it holds."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: model directory not found")
    cfg = Config.from_json(path)
    files = checkpoint_files(path)
    device = torch.device(device or "cpu")  # the scripts' --device is checked by pick_device first
    names = checkpoint_names(cfg)
    if dtype is None:
        dtype = _read_dtype(files, "model.embed_tokens.weight")
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    if shard is not None:
        shard(model)
    model.to_empty(device=device)
    model.inv_freq = rope_inv_freq(cfg).to(device)
    params = dict(model.named_parameters())
    seen = set()
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    if name.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and name == "lm_head.weight"):
                        continue  # derived or tied: transformers ignores these too
                    if name not in names:
                        raise CheckpointError(f"{f}: unexpected tensor {name!r} for a {cfg.model_type} model")
                    pname, index = names[name]
                    want = params[pname].shape if index is None else torch.empty(params[pname].shape, device="meta")[index].shape
                    t = sf.get_tensor(name)
                    if t.shape != want:
                        raise CheckpointError(f"{f}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(want)}")
                    fill_rows(params[pname], t, index)
                    seen.add(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own errors: truncated file, bad header
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    missing = sorted(set(names) - seen)
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return model.eval()


@torch.no_grad()
def fill_rows(param, t, index=None):
    """param[index] = t, where param may be an FSDP2 shard (a DTensor split along dim 0): then only the
    rows this rank holds are written (torch.chunk's split: ceil(n / world) rows per rank)."""
    local, lo = param, 0
    if type(param).__name__ == "DTensor":
        local, world, rank = param.to_local(), param.device_mesh.size(), param.device_mesh.get_local_rank()
        lo = min(rank * -(-param.shape[0] // world), param.shape[0])
    hi = lo + local.shape[0]
    if index is None:
        local.copy_(t[lo:hi])
    elif lo <= index[0] < hi:  # one expert's slice of a stacked tensor
        local[(index[0] - lo, *index[1:])].copy_(t)


def _read_dtype(files, name):
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                if name in sf.keys():
                    return _ST_DTYPES[sf.get_slice(name).get_dtype()]
        except Exception as e:
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})") from None
    raise CheckpointError(f"{os.path.dirname(files[0])}: missing tensor {name!r}")


_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# ----------------------------------------------------------------------------- generation

class KVCache:
    """Preallocated keys and values for every layer: (L, B, G, T_max, S); `pos` tokens filled so far."""

    def __init__(self, cfg, B, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, B, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    def update(self, layer, k, v):  # k, v (B, G, T, S) -> the whole prefix (B, G, pos+T, S)
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=32, temperature=0.0, top_p=1.0,
             eos_token_id=None, pad_token_id=None, generator=None):
    """Greedy (temperature 0) or sampled generation with a KV cache; prompts left-padded.
    Positions follow the attention mask (HF: cumsum - 1), so padding does not shift real tokens."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id or 0)
    p = next(model.parameters())
    cache = KVCache(model.config, B, T + max_new_tokens, p.device, p.dtype)
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)  # (B, T)
    logits = model(input_ids, attention_mask, pos, cache)[:, -1]  # (B, V)
    out, done = input_ids, torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, generator)  # (B,)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done = done | (nxt == eos_token_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(nxt[:, None])], dim=1)
        pos = pos[:, -1:] + 1
        logits = model(nxt[:, None], attention_mask, pos, cache)[:, -1]
    return out


def sample(logits, temperature, top_p, generator=None):
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p (at least one)
        sp, si = probs.sort(dim=-1, descending=True)
        drop = sp.cumsum(-1) - sp >= top_p  # the mass before a token already reaches top_p (HF's rule)
        drop[..., 0] = False
        probs = torch.zeros_like(probs).scatter_(-1, si, sp.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
