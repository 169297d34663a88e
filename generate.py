"""Generation with a KV cache from moe.Transformer: greedy or sampled (temperature, nucleus), prompts
left-padded. The model reads the cache through `cache.update(layer, k, v)` and `cache.pos`."""
import torch
import torch.nn.functional as F


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
    logits = _next_logits(model, input_ids, attention_mask, pos, cache)  # (B, V)
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
        logits = _next_logits(model, nxt[:, None], attention_mask, pos, cache)
    return out


def _next_logits(model, ids, mask, pos, cache):
    """(B, V) logits of the last position. A model with a `head` (moe.Transformer) applies it to that
    position only, so the prefill of a long prompt never makes (B, T, V) logits; any other model returns
    its logits."""
    if hasattr(model, "head"):
        return model.head(model(ids, mask, pos, cache, hidden=True)[:, -1])
    return model(ids, mask, pos, cache)[:, -1]


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
