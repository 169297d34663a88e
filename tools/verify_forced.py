"""compare's reference: moe.py's forward, one recorded tensor at a time, computed twice, with the other
implementation's tensors put in wherever it recorded them.

Each op runs on two chains of values (a `Value`):
- exact: the op in fp32 (for a bf16 run) or fp64 (for an fp32 run), on the weights as the run holds them
  (rounded to its dtype): what the run would give if its arithmetic rounded nothing;
- rounded: the same op in the run's dtype, rounding where a plain run of the model rounds: every op's output,
  cos and sin, transformers' eager attention (scores, then probabilities, in the run's dtype), each weighted
  expert row. The gap between the two is what rounding does to this tensor here, the scale of compare's bound.
At every name the judge (verify_compare.Judge) compares theirs with `exact` and hands back the values to go
on with: theirs when recorded, so each tensor is judged on the ops between it and the nearest tensors they
recorded before it, and a wrong tensor is caught where it is made, not where its error has grown.

The ops are moe.py's plain code split at every recorded name (moe.py's forward cannot stop halfway); a test
checks that with nothing put in, `exact` is moe.py's output.
"""
import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F

import moe


class Value(NamedTuple):
    exact: torch.Tensor
    rounded: torch.Tensor
    taint: torch.Tensor  # (N,) bool: tokens whose routing they did not record and that may have flipped (near-ties)


def exact_dtype(run_dtype):
    """The exact chain's dtype: fp32 holds a bf16 (or fp16) run's values with 2^16 times its precision."""
    return torch.float64 if run_dtype in (torch.float32, torch.float64) else torch.float32


def up(x):  # at least fp32: where moe.py computes in fp32 (norm statistics, softmax), fp64 stays fp64
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(norm, x):  # moe.RMSNorm's plain code in x's dtype: normalise in (at least) fp32, cast back, scale
    h = up(x)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return norm.weight * h.to(x.dtype)


def rope_tables(cfg, T, dtype, exact, device):
    """cos, sin (T, S) of positions 0..T-1: from fp64 angles (exact), or as moe.py makes them (fp32 angles)."""
    S = cfg.head_dim
    if exact:
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, S, 2, dtype=torch.float64) / S))
        freqs = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, S/2)
    else:
        freqs = torch.arange(T).float()[:, None] * moe.rope_inv_freq(cfg)  # (T, S/2)
    emb = torch.cat((freqs, freqs), dim=-1).to(device)  # (T, S)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope(x, cos, sin):  # x (B, T, H, S), cos and sin (T, S): moe.apply_rope's plain formula
    cos, sin = cos[None, :, None], sin[None, :, None]  # (1, T, 1, S)
    return x * cos + moe.rotate_half(x) * sin


def attention(q, k, v):
    """q (B, T, H, S), k and v (B, T, G, S) -> (B, T, H*S): causal attention with transformers' eager roundings."""
    B, T, H, S = q.shape
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|G, T, S)
    k, v = (t.repeat_interleave(H // t.shape[1], dim=1) for t in (k, v))  # (B, H, T, S): kv head g serves H/G heads
    scores = (q @ k.transpose(2, 3)) * S ** -0.5  # (B, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(up(scores.masked_fill(~causal, float("-inf"))), dim=-1).to(q.dtype)
    return (p @ v).transpose(1, 2).reshape(B, T, H * S)


def route(logits, cfg, ids=None):
    """moe.route in the logits' dtype: (N, E) -> weights (N, K) of `ids` (default: the top-k), and the ids."""
    probs = torch.softmax(up(logits), dim=-1)  # (N, E)
    if ids is None:
        ids = probs.topk(cfg.num_experts_per_tok, dim=-1).indices  # (N, K)
    w = probs.gather(-1, ids)
    if cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return (w if cfg.topk_weights_fp32 else w.to(logits.dtype)), ids


def routed_tokens(idx, E):
    """{e: (n_e,) ascending tokens whose top-k holds e} for every expert with tokens."""
    hit = [(idx == e).any(-1).nonzero().squeeze(1) for e in range(E)]
    return {e: tok for e, tok in enumerate(hit) if len(tok)}


def expert_rows(experts, h, idx):
    """{e: (n_e, D)} each routed expert's unweighted output on its tokens (ascending), the obvious loop over
    experts from the stacked weights gate_up_proj (E, 2I, D) = [gate; up] and down_proj (E, D, I). An adapter
    inside the experts (moe.Experts.adapter: lora.ExpertLoRA, PERFT-E) is called as moe.Experts' loop calls it."""
    rows, adapter = {}, getattr(experts, "adapter", None)  # transformers' experts have none
    for e, tok in routed_tokens(idx, experts.gate_up_proj.shape[0]).items():
        x = h[tok]  # (n, D)
        gu = F.linear(x, experts.gate_up_proj[e])  # (n, 2I)
        if adapter is not None:
            gu = adapter.gate_up(e, gu, x)
        a = moe.swiglu(gu)  # (n, I)
        y = F.linear(a, experts.down_proj[e])  # (n, D)
        rows[e] = y if adapter is None else adapter.down(e, y, a, x)
    return rows


def combine(rows, tokens, idx, w, like):
    """sum over slots of weight * expert row, (N, D): moe.Experts.forward_loop's order and roundings."""
    out = torch.zeros_like(like)
    for e, y in rows.items():
        wt = (w * (idx == e)).sum(-1)[tokens[e]]  # (n,) the weight of e for each of its tokens (one slot holds e)
        out.index_add_(0, tokens[e], (y * wt[:, None]).to(out.dtype))
    return out


def per_slot(rows, tokens, idx, w):
    """(N, K, D) exact weighted rows in (token, slot) order: which term of the sum each slot is."""
    N, K = idx.shape
    out = next(iter(rows.values())).new_zeros(N, K, next(iter(rows.values())).shape[-1])
    for e, y in rows.items():
        slot = (idx[tokens[e]] == e).float().argmax(-1)  # (n,)
        out[tokens[e], slot] = y * w[tokens[e], slot, None].to(y.dtype)
    return out


def twice(module, exact, run):
    """The module in the exact chain's dtype and in the run's, plain code, eval mode."""
    pair = tuple(copy.deepcopy(module).to(d).eval() for d in (exact, run))
    for m in pair:
        moe.set_plain(m, True)
    return pair


def apply(fn, mods, *vals, taint=None):
    """fn(module, *tensors) on both chains; the tokens tainted are those of the inputs (or `taint`)."""
    exact = fn(mods[0], *(v.exact for v in vals))
    rounded = fn(mods[1], *(v.rounded for v in vals))
    if taint is None:
        taint = vals[0].taint.clone()
        for v in vals[1:]:
            taint |= v.taint
    return Value(exact, rounded, taint)


@torch.no_grad()
def forward(model, ids, run_dtype, judge):
    """The forward pass of `model` (moe.Transformer, weights in the run's dtype) on ids (B, T), each recorded
    name handed to judge.tensor / .routing / .experts, which return the values to carry on with."""
    cfg, (B, T) = model.config, ids.shape
    N, ex, dev = B * T, exact_dtype(run_dtype), ids.device
    clean = torch.zeros(N, dtype=torch.bool, device=dev)
    emb = twice(model.model.embed_tokens, ex, run_dtype)
    x = judge.tensor("model.embed_tokens", apply(lambda m, i: m(i), emb, Value(ids, ids, clean)))
    (cos_e, sin_e), (cos_r, sin_r) = rope_tables(cfg, T, ex, True, dev), rope_tables(cfg, T, run_dtype, False, dev)
    for i, block in enumerate(model.model.layers):
        L, p = twice(block, ex, run_dtype), f"model.layers.{i}."
        a = L[0].self_attn
        h = judge.tensor(p + "input_layernorm", apply(lambda m, x: rms_norm(m.input_layernorm, x), L, x))
        q, k, v = (judge.tensor(p + f"self_attn.{n}_proj", apply(lambda m, h, n=n: getattr(m.self_attn, f"{n}_proj")(h), L, h))
                   for n in "qkv")

        def qk(m, t, rot, n, heads):  # moe.Attention's order: full norm, clip, heads, per-head norm, RoPE
            t = rms_norm(getattr(m.self_attn, f"{n}_norm"), t) if a.qk_norm == "full" else t
            t = t if a.clip is None else t.clamp(-a.clip, a.clip)
            t = t.view(B, T, heads, a.S)  # (B, T, H|G, S)
            t = rms_norm(getattr(m.self_attn, f"{n}_norm"), t) if a.qk_norm == "head" else t
            return rope(t, *rot[0 if t.dtype == ex else 1])

        rot = ((cos_e, sin_e), (cos_r, sin_r))
        q = judge.tensor(p + "self_attn.q", apply(lambda m, t: qk(m, t, rot, "q", a.H), L, q))
        k = judge.tensor(p + "self_attn.k", apply(lambda m, t: qk(m, t, rot, "k", a.G), L, k))
        v = judge.tensor(p + "self_attn.v", apply(lambda m, t: (t if a.clip is None else t.clamp(-a.clip, a.clip))
                                                  .view(B, T, a.G, a.S), L, v))
        seen = (k.taint | v.taint).view(B, T).cumsum(1).bool().view(N)  # a key's difference reaches later queries
        o = judge.tensor(p + "self_attn.o_proj.input", apply(lambda m, q, k, v: attention(q, k, v), L, q, k, v,
                                                             taint=q.taint | seen))
        o = judge.tensor(p + "self_attn", apply(lambda m, o: m.self_attn.o_proj(o), L, o))
        x = apply(lambda m, x, o: x + o, L, x, o)  # the residual after attention (no name)
        h = judge.tensor(p + "post_attention_layernorm", apply(lambda m, x: rms_norm(m.post_attention_layernorm, x), L, x))
        if isinstance(block.mlp, moe.MoE):
            y = moe_block(judge, p, L, h, cfg, N)
        else:
            y = apply(lambda m, h: m.mlp(h), L, h)
        y = judge.tensor(p + "mlp", y)
        x = judge.tensor(p[:-1], apply(lambda m, x, y: x + y, L, x, y))
    top = twice(model.model.norm, ex, run_dtype)
    x = judge.tensor("model.norm", apply(lambda m, x: rms_norm(m, x), top, x))
    head = twice(model.lm_head if model.lm_head is not None else model.model.embed_tokens, ex, run_dtype)
    tied = model.lm_head is None  # the head is the embedding matrix
    logits = judge.tensor("lm_head", apply(lambda m, x: F.linear(x, m.weight) if tied else m(x), head, x))
    loss = lambda m, lg: F.cross_entropy(up(lg)[:, :-1].reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1))
    judge.tensor("loss", apply(loss, head, logits, taint=logits.taint.any().reshape(1)))


def moe_block(judge, p, L, h, cfg, N):
    """Router -> top-k -> experts -> weighted sum (+ shared expert, + PERFT adapter) on both chains."""
    flat = lambda t: t.reshape(N, -1)  # (B, T, ...) -> (N, ...)
    logits = judge.tensor(p + "mlp.gate", apply(lambda m, h: m.mlp.gate(h), L, h))
    idx, w = judge.routing(p + "mlp.", logits, lambda lg, ids=None: route(flat(lg), cfg, ids))  # (N, K), Value (N, K)
    taint = w.taint
    tokens = routed_tokens(idx, cfg.num_experts)
    rows = {0: expert_rows(L[0].mlp.experts, flat(h.exact), idx), 1: expert_rows(L[1].mlp.experts, flat(h.rounded), idx)}
    for e, tok in tokens.items():  # judged, but the sum below uses the reference's rows: a verifier's rows are often
        judge.experts(p + "mlp.", e, tok, Value(rows[0][e], rows[1][e], taint[tok]))  # a second computation, not the one summed
    judge.experts_done(p + "mlp.", tokens)
    y = Value(combine(rows[0], tokens, idx, w.exact, flat(h.exact)).view_as(h.exact),
              combine(rows[1], tokens, idx, w.rounded, flat(h.rounded)).view_as(h.rounded), taint)
    y = judge.tensor(p + "mlp.experts", y, slots=(per_slot(rows[0], tokens, idx, w.exact), idx) if rows[0] else None)
    if cfg.shared_expert_intermediate_size:
        g = judge.tensor(p + "mlp.shared_expert_gate", apply(lambda m, h: m.mlp.shared_expert_gate(h), L, h))
        s = judge.tensor(p + "mlp.shared_expert", apply(lambda m, h: m.mlp.shared_expert(h), L, h))
        y = apply(lambda m, y, g, s: y + torch.sigmoid(g) * s, L, y, g, s)
    if L[0].mlp.adapter is not None:  # PERFT beside the block
        y = apply(lambda m, y, h, w: y + m.mlp.adapter(flat(h), w).view_as(y), L, y, h, w)  # w: --perft-weights base
    return y
