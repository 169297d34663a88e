"""A Mixture-of-Experts decoder (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) in plain PyTorch, as a reader
expects it: config, RMSNorm, RoPE, SwiGLU, attention, router -> top-k -> the loop over experts -> combine,
block, model, losses. It gives the logits of transformers' eager forward, with its roundings. Files are
files/hub.py's job, generation generate.py's, a quantized base quant.py's. Speed: RMSNorm, RoPE, the experts
(and their LoRA) and the loss have fast twins in moe_fast.py (`plain` flags; `model.set_plain(True)`: all the
plain code here). Adapters hook in through Experts.adapter and MoE.adapter (None here).

Shape letters: B batch, T time, D hidden, H query heads, G kv heads, S head size, E experts, K top-k,
I expert width, N tokens (B*T), P (token, slot) pairs (N*K), V vocabulary.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import moe_fast

MODEL_TYPES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe")


class ConfigError(ValueError):
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

    @staticmethod
    def from_json(src, where="config dict"):
        """Fill from a parsed config.json (v4 or v5 keys); `where` names it in errors (hub.read_config: the file)."""
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
            model_type=mt, vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate_size=c["intermediate_size"],
            moe_intermediate_size=c["moe_intermediate_size"] if qwen else c["intermediate_size"],
            shared_expert_intermediate_size=c.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0,
            num_experts=experts, num_experts_per_tok=c["num_experts_per_tok"],
            norm_topk_prob=True if mt == "mixtral" else bool(c.get("norm_topk_prob", False)),
            topk_weights_fp32=mt == "mixtral",
            decoder_sparse_step=c.get("decoder_sparse_step", 1) if qwen else 1,
            mlp_only_layers=tuple(c.get("mlp_only_layers") or ()) if qwen else (),
            rms_norm_eps=c.get("rms_norm_eps", 1e-5 if mt in ("olmoe", "mixtral") else 1e-6),
            rope_theta=float(theta), max_position_embeddings=c.get("max_position_embeddings", 4096),
            attention_bias=bool(c.get("attention_bias", False)) if mt in ("olmoe", "qwen3_moe") else False,
            qkv_bias=bool(c.get("qkv_bias", True)) if mt == "qwen2_moe" else False,
            qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(mt, ""),
            clip_qkv=c.get("clip_qkv") if mt == "olmoe" else None,
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            router_aux_loss_coef=c.get("router_aux_loss_coef", 0.01 if mt == "olmoe" else 0.001),
            torch_dtype=c.get("dtype") or c.get("torch_dtype") or "float32",
            pad_token_id=c.get("pad_token_id"), bos_token_id=c.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )


# ----------------------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.plain = False  # True: the plain code below; False: moe_fast.RMSNormFn, the same fused

    def forward(self, x):
        if not self.plain:
            return moe_fast.RMSNormFn.apply(x, self.weight, self.eps)
        h = x.float()  # HF's roundings: normalise in fp32, cast back to x's dtype, then scale
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg):
    S = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, S, 2, dtype=torch.float) / S))  # (S/2,) fp32, on the CPU as HF


def rotate_half(x):  # [x1, x2] -> [-x2, x1]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin, plain=True):  # x (B, H, T, S), cos and sin (B, 1, T, S)
    return x * cos + rotate_half(x) * sin if plain else moe_fast.RoPEFn.apply(x, cos, sin)


def swiglu(gu):  # gu = [g, u] (rows, 2I) -> silu(g) * u (rows, I)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def expert_linear(x, w, e):  # x @ w[e]^T; a quantized w (quant.QuantWeight) dequantizes expert e for this product
    return w.linear(x, e) if hasattr(w, "linear") else F.linear(x, w[e])


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
        if cfg.qk_norm:  # "full": over all heads' projection (OLMoE); "head": over each head (Qwen3-MoE)
            q, k = (self.H * self.S, self.G * self.S) if cfg.qk_norm == "full" else (self.S, self.S)
            self.q_norm, self.k_norm = RMSNorm(q, cfg.rms_norm_eps), RMSNorm(k, cfg.rms_norm_eps)
        self.plain = False  # RoPE: the plain apply_rope (True) or moe_fast.RoPEFn

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
        q, k = apply_rope(q, cos, sin, self.plain), apply_rope(k, cos, sin, self.plain)
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
    layer: int | None = None  # set by Transformer.body: torch.compile specialises on each int a block reads


def route(logits, k, renorm):
    """transformers' top-k router: softmax in fp32 over all experts, the top k, renormalised to sum to 1 if
    `renorm`. logits (N, E) -> weights (N, K) fp32, ids (N, K). The base MoE routes with it, and so do the
    adapters' own routers (PERFT-R, DMEP) and everything that counts routing (losses, profile, tracking)."""
    probs = F.softmax(logits.float(), dim=-1)  # (N, E)
    w, idx = torch.topk(probs, k, dim=-1)  # (N, K)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w, idx


class Experts(nn.Module):
    """E SwiGLU experts stored stacked: gate_up_proj (E, 2I, D) = [gate; up], down_proj (E, D, I) (or quant.py's
    QuantWeights). The reference is the loop below; moe_fast.grouped_experts, the same as grouped products over
    all (token, slot) pairs sorted by expert, runs where grouped_mm can (`groupable`) unless `plain` is set.

    `adapter` (None here) adds updates inside the experts: lora.ExpertLoRA or perft.ExpertAdapter (PERFT-E).
    The loop calls its plain hooks on one expert's rows at a time (input unchanged for an expert not adapted),
        gu = adapter.gate_up(e, gu, x)      gate_up_proj's output (n, 2I) plus e's update from x (n, D)
        y = adapter.down(e, y, h, x)        down_proj's output (n, D) plus e's update from h = swiglu(gu) or x
    the grouped path their fast twins (moe_fast.grouped_experts says how)."""

    def __init__(self, E, D, I):
        super().__init__()
        self.E, self.I = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.groupable = moe_fast.can_group(D, I)
        self.plain, self.adapter = False, None

    def forward(self, x, idx, w):  # x (N, D), idx (N, K), w (N, K) -> (N, D)
        if self.plain or not self.groupable:
            return self.forward_loop(x, idx, w)
        return moe_fast.grouped_experts(x, idx, w, self.gate_up_proj, self.down_proj, self.adapter)

    def forward_loop(self, x, idx, w):
        out = torch.zeros_like(x)
        for e in range(self.E):
            slot, tok = torch.where(idx.T == e)  # HF's order: by slot, then token
            if tok.numel() == 0:
                continue
            xe = x[tok]  # (n, D)
            gu = expert_linear(xe, self.gate_up_proj, e)  # (n, 2I)
            if self.adapter is not None:
                gu = self.adapter.gate_up(e, gu, xe)
            h = swiglu(gu)  # (n, I)
            y = expert_linear(h, self.down_proj, e)  # (n, D)
            if self.adapter is not None:
                y = self.adapter.down(e, y, h, xe)
            out.index_add_(0, tok, (y * w[tok, slot, None]).to(out.dtype))  # weighted with HF's rounding
        return out


class MoE(nn.Module):
    """Router + routed experts (+ Qwen2-MoE's sigmoid-gated shared expert), reading h (N, D).
    `adapter` (PERFT's adapters, None here) runs beside the whole block: y += adapter(h, w), w the top-K weights."""

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
        w, idx = route(logits, self.cfg.num_experts_per_tok, self.cfg.norm_topk_prob)  # (N, K), (N, K)
        w = w if self.cfg.topk_weights_fp32 else w.to(logits.dtype)
        y = self.experts(h, idx, w)  # (N, D)
        if self.cfg.shared_expert_intermediate_size:
            y = y + torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)
        if self.adapter is not None:
            y = y + self.adapter(h, w)
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

def set_plain(module, flag=True):
    """Every layer under `module` runs its plain code (True) or its fast twin in moe_fast.py (False)."""
    for m in module.modules():
        if hasattr(m, "plain"):
            m.plain = flag


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config, self.quantization = cfg, None  # quant.py's record of a quantized base
        self.model = nn.ModuleDict(dict(  # names mirror the checkpoint: model.layers.0.self_attn.q_proj.weight
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpoint = False  # recompute each block in the backward pass (train.py --grad-checkpoint)
        self.plain = False  # the loss: plain cross-entropy (True) or moe_fast's chunked one

    def set_plain(self, flag=True):  # the whole step on this file's plain code, or (False) moe_fast.py's twins
        set_plain(self, flag)

    def set_expert_path(self, path):  # only the experts and their adapters: "loop" (plain) or "fast"
        assert path in ("fast", "loop"), path
        for m in self.modules():
            if isinstance(m, Experts):
                set_plain(m, path == "loop")

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

def cross_entropy_sum(model, h, labels, ignore_index=-100):
    """Sum of the token losses over the labelled positions (labels already aligned with h (B, T, D)),
    from the fp32 logits of model.head. The fast twin (model.plain False, or a model without the
    flag) makes the logits a chunk of rows at a time: moe_fast.chunked_cross_entropy_sum."""
    if not getattr(model, "plain", False):
        return moe_fast.chunked_cross_entropy_sum(model.head, h, labels, ignore_index=ignore_index)
    logits = model.head(h.reshape(-1, h.shape[-1])).float()  # (N, V)
    return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")


def load_balancing_loss(router_logits, num_experts, top_k, attention_mask=None, all_sum=None):
    """transformers' load_balancing_loss_func: E * sum_e f_e * P_e, pooled over all layers; padding masked.
    f_e: share of (token, slot) assignments to e; P_e: mean router probability of e. Uniform routing gives k.
    all_sum (torchrun: parallel.all_sum): f_e and the token count become global, P_e keeps this rank's sum,
    so the ranks' terms and their gradients add up to the loss and gradient of the whole batch."""
    counts, probs, rows = 0.0, 0.0, 0.0
    m = None if attention_mask is None else attention_mask.reshape(-1).float()  # (N,)
    for logits in router_logits:  # (N, E) per layer
        p = F.softmax(logits.float(), dim=-1)  # (N, E)
        sel = route(logits, top_k, renorm=False)[1]  # (N, K)
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
