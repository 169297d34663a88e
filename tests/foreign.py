"""An MoE decoder written another way, the implementation a verifier brings to verify.py (test_verify_foreign.py).

gpt-fast's style, not this repository's: q, k and v from one fused matrix, RoPE on the two halves with
precomputed (T, S/2) tables, sdpa with repeated kv heads, the router a bare matrix (no module), top-k not sorted,
experts gathered per token and applied with einsum (no loop over experts), norms computed in fp32 and cast once.
It reads the hub checkpoint itself and imports nothing from this repository. `bugs` plants the classic errors
of a port; each is named where verify.py should find it.
"""
import glob
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

BUGS = {"softmax_after_topk", "interleaved_rope", "positions_off_by_one", "gate_up_swapped", "norm_eps",
        "routed_scale", "experts_shifted", "capacity"}


def apply_rotary(x, cos, sin, interleaved=False):  # x (B, T, H, S), cos and sin (T, S/2)
    cos, sin = cos[None, :, None], sin[None, :, None]
    if interleaved:  # GPT-J pairs (2j, 2j+1): a bug for these checkpoints
        x1, x2 = x[..., ::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)  # pairs (j, j + S/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def combine(expert_outs, weights):  # (N, K, D), (N, K) -> (N, D)
    return torch.einsum("tai,ta->ti", expert_outs, weights.to(expert_outs.dtype))


class RMSNorm(nn.Module):
    def __init__(self, w, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(w), eps

    def forward(self, x):  # everything in fp32, one rounding at the end
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c, W, p, eps, bugs):
        super().__init__()
        self.H, self.G, self.S, self.clip, self.bugs = c["heads"], c["kv_heads"], c["head_dim"], c.get("clip_qkv"), bugs
        names = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        self.wqkv = nn.Linear(1, 1, bias=f"{names[0]}.bias" in W)
        self.wqkv.weight = nn.Parameter(torch.cat([W[f"{n}.weight"] for n in names]))  # (H*S + 2 G*S, D)
        if self.wqkv.bias is not None:
            self.wqkv.bias = nn.Parameter(torch.cat([W[f"{n}.bias"] for n in names]))
        self.wo = nn.Linear(1, 1, bias=f"{p}self_attn.o_proj.bias" in W)
        self.wo.weight = nn.Parameter(W[f"{p}self_attn.o_proj.weight"])
        if self.wo.bias is not None:
            self.wo.bias = nn.Parameter(W[f"{p}self_attn.o_proj.bias"])
        self.qk_norm = c["qk_norm"]
        if self.qk_norm:
            self.q_norm, self.k_norm = (RMSNorm(W[f"{p}self_attn.{n}_norm.weight"], eps) for n in "qk")

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q, k, v = self.wqkv(x).split([self.H * self.S, self.G * self.S, self.G * self.S], dim=-1)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = q.view(B, T, self.H, self.S), k.view(B, T, self.G, self.S), v.view(B, T, self.G, self.S)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        inter = "interleaved_rope" in self.bugs
        q, k = apply_rotary(q, cos, sin, inter), apply_rotary(k, cos, sin, inter)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H|G, T, S)
        k, v = (t.repeat_interleave(self.H // self.G, dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.H * self.S))


class FeedForward(nn.Module):  # dense SwiGLU (Qwen's dense layers and shared expert)
    def __init__(self, W, p):
        super().__init__()
        self.w1, self.w3, self.w2 = (nn.Linear(1, 1, bias=False) for _ in range(3))
        for lin, n in ((self.w1, "gate"), (self.w3, "up"), (self.w2, "down")):
            lin.weight = nn.Parameter(W[f"{p}{n}_proj.weight"])

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class ConditionalFeedForward(nn.Module):
    """All experts' weights stacked; each (token, slot) gathers its expert's matrices: (N, K, D) outputs."""

    def __init__(self, w1, w2, w3, bugs):
        super().__init__()
        self.w1, self.w2, self.w3, self.bugs = nn.Parameter(w1), nn.Parameter(w2), nn.Parameter(w3), bugs  # (E, I, D) ...

    def forward(self, x, ids):  # x (N, D), ids (N, K)
        if "experts_shifted" in self.bugs:
            ids = (ids + 1) % self.w1.shape[0]
        w1, w3, w2 = self.w1[ids], self.w3[ids], self.w2[ids]  # (N, K, I, D), (N, K, I, D), (N, K, D, I)
        g, u = torch.einsum("ti,taoi->tao", x, w1), torch.einsum("ti,taoi->tao", x, w3)
        if "gate_up_swapped" in self.bugs:
            g, u = u, g
        out = torch.einsum("tao,taio->tai", F.silu(g) * u, w2)  # (N, K, D)
        if "capacity" in self.bugs:  # each expert takes at most half its fair share, first come first served
            cap = max(1, ids.numel() // (2 * self.w1.shape[0]))
            flat = ids.reshape(-1)
            rank = (F.one_hot(flat, self.w1.shape[0]).cumsum(0) * F.one_hot(flat, self.w1.shape[0])).sum(-1) - 1
            out = out * (rank < cap).view(ids.shape)[..., None].to(out.dtype)
        return out


class MOEFeedForward(nn.Module):
    def __init__(self, c, W, p, bugs):
        super().__init__()
        E, self.K, self.renorm, self.bugs = c["experts"], c["topk"], c["norm_topk_prob"], bugs
        mix = c["model_type"] == "mixtral"
        q = f"{p}block_sparse_moe." if mix else f"{p}mlp."
        self.router = nn.Parameter(W[q + "gate.weight"])  # (E, D): a bare matrix, no module
        names = ("w1", "w3", "w2") if mix else ("gate_proj", "up_proj", "down_proj")
        stack = [torch.stack([W[f"{q}experts.{e}.{n}.weight"] for e in range(E)]) for n in names]
        self.cond_ffn = ConditionalFeedForward(stack[0], stack[2], stack[1], bugs)
        self.shared = FeedForward(W, f"{p}mlp.shared_expert.") if f"{p}mlp.shared_expert_gate.weight" in W else None
        if self.shared is not None:
            self.shared_gate = nn.Parameter(W[f"{p}mlp.shared_expert_gate.weight"])  # (1, D)

    def forward(self, x):  # (B, T, D)
        h = x.reshape(-1, x.shape[-1])  # (N, D)
        scores = h @ self.router.T  # (N, E)
        if "softmax_after_topk" in self.bugs:
            top, ids = torch.topk(scores.float(), self.K, dim=-1, sorted=False)
            weights = top.softmax(-1)
        else:
            weights, ids = torch.topk(scores.float().softmax(-1), self.K, dim=-1, sorted=False)
            if self.renorm:
                weights = weights / weights.sum(-1, keepdim=True)
        y = combine(self.cond_ffn(h, ids), weights)
        if "routed_scale" in self.bugs:
            y = y * 1.03
        if self.shared is not None:
            y = y + torch.sigmoid(h @ self.shared_gate.T) * self.shared(h)
        return y.view_as(x)


class Block(nn.Module):
    def __init__(self, c, W, i, bugs):
        super().__init__()
        p, eps = f"model.layers.{i}.", c["eps"]
        self.attention_norm = RMSNorm(W[p + "input_layernorm.weight"], eps)
        self.attention = Attention(c, W, p, eps, bugs)
        self.ffn_norm = RMSNorm(W[p + "post_attention_layernorm.weight"], eps)
        moe = i not in c["mlp_only"] and (i + 1) % c["sparse_step"] == 0
        self.feed_forward = MOEFeedForward(c, W, p, bugs) if moe else FeedForward(W, p + "mlp.")

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, path, dtype=torch.float32, bugs=()):
        super().__init__()
        assert set(bugs) <= BUGS, set(bugs) - BUGS
        raw = json.load(open(os.path.join(path, "config.json")))
        W = {}
        for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
            with safe_open(f, framework="pt") as sf:
                W.update({n: sf.get_tensor(n).to(dtype) for n in sf.keys()})
        heads = raw["num_attention_heads"]
        mt = raw["model_type"]
        c = dict(model_type=mt, heads=heads, kv_heads=raw.get("num_key_value_heads") or heads,
                 head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, clip_qkv=raw.get("clip_qkv"),
                 qk_norm={"olmoe": "full", "qwen3_moe": "head"}.get(mt, ""),
                 eps=raw["rms_norm_eps"] / (10 if "norm_eps" in bugs else 1),
                 experts=raw.get("num_experts") or raw.get("num_local_experts"), topk=raw["num_experts_per_tok"],
                 norm_topk_prob=mt == "mixtral" or raw.get("norm_topk_prob", False),
                 mlp_only=raw.get("mlp_only_layers") or [], sparse_step=raw.get("decoder_sparse_step", 1))
        theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
        self.bugs, self.S, self.theta, self.dtype = set(bugs), c["head_dim"], theta, dtype
        self.tok_embeddings = nn.Embedding.from_pretrained(W["model.embed_tokens.weight"])
        self.layers = nn.ModuleList(Block(c, W, i, self.bugs) for i in range(raw["num_hidden_layers"]))
        self.norm = RMSNorm(W["model.norm.weight"], c["eps"])
        self.output = nn.Linear(1, 1, bias=False)
        self.output.weight = nn.Parameter(W.get("lm_head.weight", W["model.embed_tokens.weight"]))  # tied: the embeddings
        self.requires_grad_(False)

    def rope_tables(self, T):  # (T, S/2) cos and sin, angles in fp32
        pos = torch.arange(T, dtype=torch.float32) + ("positions_off_by_one" in self.bugs)
        inv = 1.0 / self.theta ** (torch.arange(0, self.S, 2, dtype=torch.float32) / self.S)
        ang = torch.outer(pos, inv)
        return ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    def forward(self, idx):  # (B, T) -> logits (B, T, V)
        cos, sin = self.rope_tables(idx.shape[1])
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.output(self.norm(x))


def loss_of(logits, idx):  # mean next-token cross-entropy in fp32
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
