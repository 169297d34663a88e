"""The names verify.py knows: every tensor a run can record, its shape, dtype, layout and meaning, in the
order moe.py's forward makes them (`python -m tools.verify names` prints it as text or JSON).

A name is the hub module whose output the tensor is (`model.layers.3.mlp.gate`: layer 3's router), so a
verifier finds the place in any implementation; a few have no module (q and k after RoPE, the top-k choice,
one expert's rows, the loss) and are described here. Token n of a (B, T, ...) tensor is b*T + t. Besides the
table: which names a given model has (`names_of`), and which of a file's names are unknown or look like a
misspelling of a known one (`check_names`).
"""
import difflib
import re

# (name pattern, shape, dtype, meaning); "i." stands for each layer "model.layers.<i>.", "<e>" for an expert
SCHEMA = [
    ("input_ids", "(B, T)", "int", "the token ids the run was fed: B sequences of T tokens, no padding, "
     "positions 0 .. T-1"),
    ("attention_mask", "(B, T)", "int", "all 1 (there is no padding); optional, not compared"),
    ("model.embed_tokens", "(B, T, D)", "run", "the embeddings of the ids"),
    ("i.input_layernorm", "(B, T, D)", "run", "the attention input norm (RMSNorm of the residual stream)"),
    ("i.self_attn.q_proj", "(B, T, H*S)", "run", "q projection, bias and adapter included, before q/k norm"),
    ("i.self_attn.k_proj", "(B, T, G*S)", "run", "k projection, as q_proj"),
    ("i.self_attn.v_proj", "(B, T, G*S)", "run", "v projection, as q_proj"),
    ("i.self_attn.q", "(B, T, H, S)", "run", "q as attention reads it: after q/k norm, clip_qkv and RoPE "
     "(rotate_half: dims j and j + S/2 form a pair), before the 1/sqrt(S) scale"),
    ("i.self_attn.k", "(B, T, G, S)", "run", "k as attention reads it, as q (before repeating for GQA)"),
    ("i.self_attn.v", "(B, T, G, S)", "run", "v as attention reads it: after clip_qkv"),
    ("i.self_attn.o_proj.input", "(B, T, H*S)", "run", "attention output, heads concatenated (head h at "
     "h*S .. (h+1)*S), before o_proj"),
    ("i.self_attn", "(B, T, D)", "run", "attention block output, after o_proj (before the residual add)"),
    ("i.post_attention_layernorm", "(B, T, D)", "run", "the MLP input norm (of the residual after attention)"),
    ("i.mlp.gate", "(B, T, E)", "run", "router logits, before the softmax (MoE layers)"),
    ("i.mlp.topk_ids", "(B, T, K)", "int", "the experts each token is routed to, in any order"),
    ("i.mlp.topk_weights", "(B, T, K)", "run", "their weights, slot k belonging to topk_ids slot k (after "
     "any renormalisation)"),
    ("i.mlp.experts.<e>", "(n_e, D)", "run", "expert e's unweighted output on each token whose top-k holds e, "
     "in ascending token order (needs topk_ids)"),
    ("i.mlp.experts", "(B, T, D)", "run", "the weighted sum of the routed experts"),
    ("i.mlp.shared_expert_gate", "(B, T, 1)", "run", "the shared expert's gate logit, before the sigmoid "
     "(Qwen2-MoE)"),
    ("i.mlp.shared_expert", "(B, T, D)", "run", "the shared expert's output, before its gate (Qwen2-MoE)"),
    ("i.mlp", "(B, T, D)", "run", "the MLP block output: routed (+ shared expert, + a PERFT adapter), or the "
     "dense MLP (before the residual add)"),
    ("i", "(B, T, D)", "run", "the residual stream after layer i"),
    ("model.norm", "(B, T, D)", "run", "the final norm"),
    ("lm_head", "(B, T, V)", "run", "the logits over the real vocabulary (cut any padding of V)"),
    ("loss", "()", "float32", "mean next-token cross-entropy of the B*(T-1) predictions"),
    ("grad.<adapter tensor>", "as the tensor", "float32", "d loss / d that adapter tensor, one step on these "
     "ids (dump --adapter RUN --grad only)"),
]
LAYOUT = ("B sequences, T tokens, D hidden, H query heads, G kv heads, S head size, E experts, K top-k, "
          "V vocabulary; token n = b*T + t; 'run': the run's floating dtype (declare it, see tools/capture.py); "
          "(B, T, ...) tensors may also be given as (B*T, ...) or with the trailing dims merged or split")
_LAYER = {p[2:]: (shape, dtype, what) for p, shape, dtype, what in SCHEMA if p.startswith("i.")}
_TOP = {p: (shape, dtype, what) for p, shape, dtype, what in SCHEMA if not p.startswith("i.") and p != "i"}
_RESIDUAL = next((s, d, w) for p, s, d, w in SCHEMA if p == "i")


def entry(name):
    """(shape, dtype, meaning) of a tensor name, None when it is not one verify.py knows."""
    m = re.fullmatch(r"model\.layers\.\d+(?:\.(.*))?", name)
    if m:
        part = m[1]
        return _RESIDUAL if part is None else _LAYER.get(re.sub(r"experts\.\d+$", "experts.<e>", part))
    return _TOP.get("grad.<adapter tensor>") if name.startswith("grad.") else _TOP.get(name)


def what(name):
    e = entry(name)
    return e and e[2]


def describe(name, L):
    """dict(layer, depth, what) of a tensor name in an L-layer model: layer -1 before the first block, L after."""
    if name.startswith("grad."):
        return dict(layer=L, depth=2 * (L + 2), what=what(name))
    m = re.match(r"model\.layers\.(\d+)", name)
    layer = int(m[1]) if m else -1 if name in ("input_ids", "attention_mask", "model.embed_tokens") else L
    return dict(layer=layer, depth=1 if layer < 0 else layer + 2, what=what(name))


def layer_parts(cfg, i):
    """The names of layer i's tensors in forward order (without the "model.layers.i." prefix)."""
    parts = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q",
             "self_attn.k", "self_attn.v", "self_attn.o_proj.input", "self_attn", "post_attention_layernorm"]
    if cfg.is_moe_layer(i):
        parts += ["mlp.gate", "mlp.topk_ids", "mlp.topk_weights", *(f"mlp.experts.{e}" for e in range(cfg.num_experts)),
                  "mlp.experts"]
        if cfg.shared_expert_intermediate_size:
            parts += ["mlp.shared_expert_gate", "mlp.shared_expert"]
    return parts + ["mlp", ""]


def shapes(cfg):
    """{letter: size} of a model's dimensions (B and T are the run's)."""
    return dict(D=cfg.hidden_size, H=cfg.num_attention_heads, G=cfg.num_key_value_heads, S=cfg.head_dim,
                E=cfg.num_experts, K=cfg.num_experts_per_tok, V=cfg.vocab_size)


def names_of(cfg):
    """[(name, shape, dtype, meaning)] of every tensor a run of this model can record, in forward order."""
    out = [(n, *entry(n)) for n in ("input_ids", "attention_mask", "model.embed_tokens")]
    for i in range(cfg.num_hidden_layers):
        for part in layer_parts(cfg, i):
            name = f"model.layers.{i}" + (f".{part}" if part else "")
            shape, dtype, meaning = entry(name)
            if not cfg.is_moe_layer(i) and part == "mlp":
                meaning = "the dense MLP's output (this layer has no experts)"
            if part.startswith("mlp.experts."):
                meaning = meaning.replace("expert e's", f"expert {part.rsplit('.', 1)[1]}'s").replace(" whose top-k holds e", " routed to it")
            out.append((name, shape, dtype, meaning))
    return out + [(n, *entry(n)) for n in ("model.norm", "lm_head", "loss")]


def concrete(shape, cfg):
    """'(B, T, H, S)' -> '(B, T, 4, 16)' for this model."""
    size = shapes(cfg)
    shape = shape.replace("H*S", str(size["H"] * size["S"])).replace("G*S", str(size["G"] * size["S"]))
    return re.sub(r"\b[DHGSEKV]\b", lambda m: str(size[m[0]]), shape)


def check_names(names, known):
    """(unknown, misspelled): the names verify does not know, and among them {name: the known name it looks like}
    (a close spelling, or a layer or expert this model does not have). The others are the implementation's own
    names: listed, not failed."""
    unknown = [n for n in names if n not in known]
    pool = sorted(known)
    misspelled = {}
    for n in unknown:
        close = difflib.get_close_matches(n, pool, n=1, cutoff=0.85)
        if close or entry(n) is not None:  # entry: a right pattern for a layer or expert this model lacks
            misspelled[n] = close[0] if close else None
    return unknown, misspelled


def generic():
    """SCHEMA with each layer's names spelled out: model.layers.<i>.self_attn.q, ..."""
    spell = lambda p: "model.layers.<i>" + p[1:] if p == "i" or p.startswith("i.") else p
    return [(spell(p), s, d, w) for p, s, d, w in SCHEMA]


def text(cfg=None):
    """The schema as text: one line per name (every layer's names when a model's config is given)."""
    lines = [f"layout: {LAYOUT}"]
    if cfg is None:
        rows = generic()
    else:
        lines.append(f"model: {cfg.model_type}, {cfg.num_hidden_layers} layers, "
                     + ", ".join(f"{k}={v}" for k, v in shapes(cfg).items()) + ", MoE layers "
                     + str([i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]))
        rows = [(n, concrete(s, cfg), d, w) for n, s, d, w in names_of(cfg)]
    width = max(len(r[0]) for r in rows)
    return "\n".join(lines + [f"{n:<{width}}  {s:<15} {d:<8} {w}" for n, s, d, w in rows])


def as_json(cfg=None):
    rows = generic() if cfg is None else [(n, concrete(s, cfg), d, w) for n, s, d, w in names_of(cfg)]
    return dict(layout=LAYOUT, tensors=[dict(name=n, shape=s, dtype=d, meaning=w) for n, s, d, w in rows])
