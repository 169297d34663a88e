"""Golden tensors from the plain reference path, and where another implementation first departs from them.

    python -m tools.verify dump --model DIR [--adapter RUN] (--data FILE | --ids "1 2 3") --out golden.safetensors
    python -m tools.verify compare golden.safetensors theirs.safetensors
    python -m tools.verify hf --model DIR              # the same tensors from transformers, compared with ours

`dump` runs moe.py's plain path (the loop over experts) on a few sequences cut to one length (no position is
padding, so every implementation computes every one) and writes the forward pass's intermediate tensors to one
safetensors file, with a JSON header ("verify") listing each tensor's name, shape, dtype, layer and what it is
(WHAT below) in forward order. Names are the hub's module names (a module's output), easy to find in any
implementation; token n of a (N, ...) tensor is b*T + t. To check yours, save the same names (any subset) with
safetensors' save_file and run compare.

Tolerance (compare): |theirs - golden| <= 16 * u * depth * max|golden| for every token; u is the unit roundoff
of the coarser of the two runs' dtypes (finfo.eps / 2: fp32 6.0e-8, bf16 2^-8 = 3.9e-3), depth the number of
layers the value has been through (1: embeddings, i + 2: layer i, L + 2: after the last; twice that for
gradients). Each layer has a few rounded operations that another implementation may round the other way
(another summation order, a fused kernel): errors of a few u of the tensor's scale per layer, adding up.
Routing: top-k sets are compared per token. A flip is a near-tie when the golden run's gap between the k-th and
(k+1)-th router probability is below the router logits' tolerance: rounding alone can swap those experts, so it
is reported, not failed. From then on the token's rows in that layer, and from the next layer on every later
token of its sequence (attention carries the difference forward), are left out, as are the loss and gradients.
"""
import argparse
import itertools
import json
import os
import re
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from files import data
from files import hub
import lora
import moe
import methods
from files import atomic
from files import tokenizer

FORMAT = "moe-lora verify 1"
PER_LAYER = 16  # tolerance: unit roundoffs per layer (see the docstring)

WHAT = {  # every tensor's name -> what it is, in the order moe.py's forward makes them
    "input_ids": "(B, T) token ids", "attention_mask": "(B, T) all 1: no padding",
    "model.embed_tokens": "(B, T, D) embeddings",
    "model.layers.i": {  # then each layer i in turn: model.layers.i.input_layernorm, ..., model.layers.i (its output)
        "input_layernorm": "(B, T, D) attention input norm",
        "self_attn.q_proj": "(B, T, H*S) q projection (bias, LoRA included)",
        "self_attn.k_proj": "(B, T, G*S) k projection", "self_attn.v_proj": "(B, T, G*S) v projection",
        "self_attn.q": "(B, T, H, S) q after q/k norm, clip_qkv and RoPE", "self_attn.k": "(B, T, G, S) k, as q",
        "self_attn.v": "(B, T, G, S) v after clip_qkv",
        "self_attn.o_proj.input": "(B, T, H*S) attention output before o_proj", "self_attn": "(B, T, D) after o_proj",
        "post_attention_layernorm": "(B, T, D) MLP input norm", "mlp.gate": "(B, T, E) router logits",
        "mlp.topk_ids": "(B, T, K) chosen experts", "mlp.topk_weights": "(B, T, K) their weights",
        "mlp.experts.*": "(n_e, D) expert e's unweighted output on its tokens (ascending), from its weights",
        "mlp.experts": "(B, T, D) weighted sum of the routed experts",
        "mlp.shared_expert_gate": "(B, T, 1) the shared expert's gate logit",
        "mlp.shared_expert": "(B, T, D) shared expert, before its gate",
        "mlp": "(B, T, D) MoE (or dense MLP) output", "": "(B, T, D) residual stream after the layer"},
    "model.norm": "(B, T, D) final norm", "lm_head": "(B, T, V) logits", "loss": "() next-token cross-entropy"}


def what(name):  # WHAT's line for a tensor name (None: not a name verify.py records)
    m = re.fullmatch(r"model\.layers\.\d+\.?(.*)", name)
    return WHAT["model.layers.i"].get(re.sub(r"experts\.\d+$", "experts.*", m[1])) if m else WHAT.get(name)


def describe(name, L):
    """dict(layer, depth, what) of a tensor name in an L-layer model: layer -1 before the first block, L after."""
    if name.startswith("grad."):
        return dict(layer=L, depth=2 * (L + 2), what="d loss / d this adapter tensor, one step on this batch")
    m = re.match(r"model\.layers\.(\d+)", name)
    layer = int(m[1]) if m else -1 if name in ("input_ids", "attention_mask", "model.embed_tokens") else L
    return dict(layer=layer, depth=1 if layer < 0 else layer + 2, what=what(name))


# ----------------------------------------------------------------------------- collecting

def expert_rows(experts, h, idx):
    """{e: (n_e, D)} each routed expert's unweighted output on its tokens (ascending), the obvious loop over
    experts from the stacked weights gate_up_proj (E, 2I, D) = [gate; up] and down_proj (E, D, I). An adapter
    inside the experts (moe.Experts.adapter: lora.ExpertLoRA, PERFT-E) is called as moe.Experts' loop calls it."""
    rows, adapter = {}, getattr(experts, "adapter", None)  # transformers' experts have none
    for e in range(experts.gate_up_proj.shape[0]):
        tok = (idx == e).any(dim=-1).nonzero().squeeze(1)  # (n,)
        if len(tok):
            x = h[tok]  # (n, D)
            gu = F.linear(x, experts.gate_up_proj[e])  # (n, 2I)
            if adapter is not None:
                gu = adapter.gate_up(e, gu, x)
            a = moe.swiglu(gu)  # (n, I)
            y = F.linear(a, experts.down_proj[e])  # (n, D)
            rows[e] = y if adapter is None else adapter.down(e, y, a, x)
    return rows


def collect(model, cfg, ids, grad=False):
    """{name: tensor} of one forward pass in the order it makes them (with grad, then d loss / d each adapter
    tensor). Forward hooks on the modules WHAT names record their outputs: moe.py's Transformer and transformers'
    models use the same names. q and k after RoPE, which no hook sees, are what the model's RoPE function returns,
    wrapped for the pass: moe.apply_rope (for q, then for k) or transformers' apply_rotary_pos_emb (both at once)."""
    B, T = ids.shape
    rec, qk = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, []
    keep = lambda t: t.detach().to("cpu", copy=True)  # a copy: transformers clamps v in place

    def hook(mod, args, out, name):  # o_proj: its input; others: the output (ours (y, routing), HF (y, weights))
        if name.endswith(".experts"):  # first the routing, read from the experts' input, and each expert's rows
            (h, idx, w), mlp = args, name[:-len("experts")]  # (N, D), (N, K), (N, K)
            rec[mlp + "topk_ids"], rec[mlp + "topk_weights"] = keep(idx).reshape(B, T, -1), keep(w).reshape(B, T, -1)
            with torch.no_grad():
                rec.update({f"{name}.{e}": keep(y) for e, y in expert_rows(mod, h, idx).items()})
        t = args[0] if name.endswith("o_proj") else out[0] if isinstance(out, tuple) else out
        rec[name + ".input" * name.endswith("o_proj")] = keep(t).reshape(B, T, -1)

    def rope(*args, **kwargs):  # q and k (B, H|G, T, S) of layer i are the (2i)-th and (2i+1)-th rotated
        out = plain(*args, **kwargs)
        qk.extend(out if isinstance(out, tuple) else [out])
        if len(qk) % 2 == 0:  # layer i's q and k: then v after clip_qkv, as the attention uses them
            p, clip = f"model.layers.{len(qk) // 2 - 1}.self_attn.", cfg.clip_qkv
            rec[p + "q"], rec[p + "k"] = (keep(t).transpose(1, 2) for t in qk[-2:])  # (B, T, H|G, S)
            v = rec[p + "v_proj"].reshape(B, T, -1, cfg.head_dim)
            rec[p + "v"] = v if clip is None else v.clamp(-clip, clip)
        return out

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in model.named_modules()
               if what(n) or what(n + ".input")]
    modeling = sys.modules[type(model).__module__]
    rope_fn = "apply_rope" if modeling is moe else "apply_rotary_pos_emb"
    plain = getattr(modeling, rope_fn)
    setattr(modeling, rope_fn, rope)
    try:
        with torch.set_grad_enabled(grad):
            out = model(ids)
            logits = out if isinstance(out, torch.Tensor) else out.logits  # (B, T, V)
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    finally:
        setattr(modeling, rope_fn, plain)
        for h in handles:
            h.remove()
    rec["lm_head"], rec["loss"] = keep(logits), keep(loss)  # lm_head: also when tied to the embeddings (no module)
    if grad:
        loss.backward()
        rec.update({f"grad.{n}": keep(p.grad) for n, p in methods.adapter_state(model).items() if p.grad is not None})
    return {n: t.cpu() for n, t in rec.items()}


# ----------------------------------------------------------------------------- the golden file

def make_header(tensors, cfg, **about):
    """The golden file's description: the model, how the tensors were made, and every tensor in forward order."""
    entries = [dict(name=n, shape=list(t.shape), dtype=str(t.dtype)[6:], **describe(n, cfg.num_hidden_layers))
               for n, t in tensors.items()]
    return dict(format=FORMAT, model_type=cfg.model_type, fingerprint=methods.fingerprint(cfg),
                num_hidden_layers=cfg.num_hidden_layers, **about, tensors=entries)


def write_golden(path, tensors, header):
    """One safetensors file; its metadata's "verify" entry is the header (JSON). Written atomically."""
    tensors = {n: t.contiguous().clone() for n, t in tensors.items()}  # v may be a view of v_proj: one copy each
    atomic.write(path, lambda tmp: save_file(tensors, tmp, metadata={"verify": json.dumps(header)}))


def read_tensors(path, need_header=False):
    """({name: tensor}, header or None); a clear error naming the file when it is not what it should be."""
    if not os.path.isfile(path):
        raise OSError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {n: f.get_tensor(n) for n in f.keys()}
    except Exception as e:  # safetensors' own errors: not a safetensors file, truncated
        raise ValueError(f"{path}: cannot read as safetensors ({e})") from None
    try:
        header = json.loads(meta["verify"]) if "verify" in meta else None
        assert header is None or header["format"] == FORMAT and {"name", "layer", "depth"} <= set(header["tensors"][0])
    except (ValueError, KeyError, TypeError, IndexError, AssertionError):
        raise ValueError(f"{path}: its 'verify' header is not one this verify.py writes ({FORMAT})") from None
    if need_header and header is None:
        raise ValueError(f"{path}: not a golden file (no 'verify' header; make one with `verify.py dump`)")
    return tensors, header


# ----------------------------------------------------------------------------- compare

def tolerance(g, t, depth, run_dtypes=()):
    """The rule of the docstring: 16 unit roundoffs per layer passed, of the tensor's largest golden value. The
    coarser dtype is that of the tensors or of the runs (the loss and gradients are fp32 also in a bf16 run)."""
    u = max(torch.finfo(d).eps for d in (g.dtype, t.dtype, *run_dtypes)) / 2  # unit roundoff of the coarser dtype
    return PER_LAYER * u * depth * max(g.abs().max().item(), 1e-30)


def close(g, t, tokens, skip, depth, run_dtypes):
    """(max abs err, err / tol, first failing token or None, note) of t against g, (M, ...) rows of `tokens`
    (None: one whole, as the loss, not failed once any token is excused); rows of `skip` tokens are left out."""
    tol = tolerance(g, t, depth, run_dtypes)
    diff = (t.float() - g.float()).abs().reshape(1 if tokens is None else len(tokens), -1).amax(-1)  # (M,) per row
    skip = skip.any().reshape(1) if tokens is None else skip[tokens]
    bad, err = (diff > tol) & ~skip, diff.max().item() if diff.numel() else 0.0
    if bad.any():
        token = -1 if tokens is None else int(tokens[bad][0])
        return err, err / tol, token, f"max abs err {diff[bad].max():.3g} > tol {tol:.3g}"
    return err, err / tol, None, "rows after a near-tie flip left out" if skip.any() else ""


def same_routing(g_ids, t_ids, g_logits, skip, tol):
    """(err, err / tol, first failing token or None, note) of the top-k sets, and the (N,) near-tie flips: the
    tokens whose sets differ where golden's gap between the k-th and (k+1)-th router probability is below tol."""
    K = g_ids.shape[-1]
    flip = (g_ids.reshape(-1, K).sort(-1).values != t_ids.reshape(-1, K).sort(-1).values).any(-1)  # (N,)
    p = torch.softmax(g_logits.reshape(flip.shape[0], -1).float(), dim=-1).sort(-1, descending=True).values
    gap = p[:, K - 1] - p[:, K] if p.shape[1] > K else torch.ones_like(p[:, 0])  # (N,); K = E: nothing to flip
    near, hard = flip & (gap < tol), (flip & (gap >= tol) & ~skip).nonzero().squeeze(1).tolist()
    if hard:
        return (1.0, 1.0, hard[0], f"top-k set differs, probability gap {gap[hard[0]]:.2g} >= {tol:.2g}"), near
    note = f"{int(near.sum())} near-tie flip(s), not failed: tokens {near.nonzero().squeeze(1).tolist()}"
    return (0.0, 0.0, None, note if near.any() else ""), near


def compare(golden, theirs, header):
    """Walk golden's tensors in forward order against theirs. Returns (rows, first divergence or None, missing):
    a row is (name, max abs err, err / tolerance, note, failed); the divergence (name, layer, token or None)."""
    (B, T), ids = golden["input_ids"].shape, golden["input_ids"].reshape(-1)
    N = B * T
    if "input_ids" in theirs and not torch.equal(theirs["input_ids"].reshape(-1), ids):
        raise ValueError("theirs was computed on other input ids than the golden file's: nothing to compare")
    run_dtypes = [f["model.embed_tokens"].dtype for f in (golden, theirs) if "model.embed_tokens" in f]
    excused, pending = torch.zeros(N, dtype=torch.bool), torch.zeros(N, dtype=torch.bool)  # near-tie tokens
    rows, first, missing, layer_now = [], None, [], -1
    for ent in header["tensors"]:
        name, layer, depth = ent["name"], ent["layer"], ent["depth"]
        g, t, expert = golden[name], theirs.get(name), re.fullmatch(r"(.*\.mlp\.)experts\.(\d+)", name)
        if layer > layer_now:  # a near-tie in layer i reaches the later tokens of its sequence from layer i+1 on
            excused, layer_now = excused | pending, layer
        if t is None or (expert and expert.group(1) + "topk_ids" not in theirs):
            missing.append(name)
        if name in missing or name in ("input_ids", "attention_mask"):
            continue
        if name.endswith(".mlp.topk_ids"):  # a flip is a near-tie within the router logits' tolerance
            router = golden[name[:-8] + "gate"]
            tol = tolerance(router, theirs.get(name[:-8] + "gate", router), depth, run_dtypes)
            (err, ratio, token, note), near = same_routing(g, t, router, excused, tol)
            excused |= near
            pending |= near.view(B, T).cumsum(1).bool().view(N)  # from each near-tie on, to the end of its sequence
        elif expert:  # the rows of the tokens routed to this expert in both runs
            g_tok, t_tok = ((f[expert.group(1) + "topk_ids"].reshape(N, -1) == int(expert.group(2))).any(-1)
                            .nonzero().squeeze(1) for f in (golden, theirs))
            if t.shape[0] != len(t_tok) or t.shape[1:] != g.shape[1:]:
                err, ratio, token, note = 1.0, 1.0, -1, f"shape {tuple(t.shape)}: not one row per token routed here"
            else:
                both = g_tok[torch.isin(g_tok, t_tok)]
                g, t = g[torch.searchsorted(g_tok, both)], t[torch.searchsorted(t_tok, both)]
                err, ratio, token, note = close(g, t, both, excused, depth, run_dtypes)
        elif g.shape != t.shape:
            err, ratio, token, note = 1.0, 1.0, -1, f"shape {tuple(t.shape)}, golden {tuple(g.shape)}"
        else:  # per token: rows of (B, T, ...) tensors; the loss and gradients whole
            per_token = g.dim() >= 2 and tuple(g.shape[:2]) == (B, T)
            g, t = (g.reshape(N, -1), t.reshape(N, -1)) if per_token else (g, t)
            err, ratio, token, note = close(g, t, torch.arange(N) if per_token else None, excused, depth, run_dtypes)
        rows.append((name, err, ratio, note, token is not None))
        if token is not None and first is None:
            first = (name, layer, None if token < 0 else token)
    return rows, first, missing


def report(golden, theirs, header, golden_name, theirs_name):
    """compare, printed: a line per tensor (per layer for its experts), then the verdict; returns the exit status."""
    rows, first, missing = compare(golden, theirs, header)
    print(f"verify: {theirs_name} against {golden_name} ({header['model_type']})")
    print(f"tolerance per token: |theirs - golden| <= {PER_LAYER} u * depth * max|golden| (u: fp32 6.0e-8, "
          "bf16 3.9e-3); near-tie routing flips are not failed")
    print(f"{'tensor':<46} {'max abs err':>11} {'err/tol':>8}")
    for name, group in itertools.groupby(rows, key=lambda r: re.sub(r"experts\.\d+$", "experts.*", r[0])):
        group = list(group)
        bad = [r for r in group if r[4]]
        if name.endswith("*"):  # name the expert in the note
            bad = [(*r[:3], f"expert {r[0].rsplit('.', 1)[1]}: {r[3]}", 1) for r in bad]
            name = f"{name} ({len(group)} experts)"
        note = bad[0][3] if bad else next((r[3] for r in group if r[3]), "")
        print(f"{name:<46} {max(r[1] for r in group):11.3g} {max(r[2] for r in group):8.3g}  "
              f"{'DIVERGES' if bad else 'ok'} {note}".rstrip())
    if missing:
        print(f"not in {theirs_name} (not compared): {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''} "
              f"({len(missing)} tensors)")
    if first is None:
        print(f"verify: no divergence beyond tolerance ({len(rows)} tensors compared, {len(missing)} missing)")
        return 0
    (name, layer, token), T = first, golden["input_ids"].shape[1]
    where = f"layer {layer}" if 0 <= layer < header["num_hidden_layers"] else "before the first layer" if layer < 0 \
        else "after the last layer"
    at = "" if token is None else f", token (b{token // T}, t{token % T})"
    print(f"verify: first divergence: {where}, {name}{at}")
    return 1


# ----------------------------------------------------------------------------- CLI

def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="verify.py", description=__doc__.split("\n")[0], epilog=__doc__[__doc__.index(
        "Tolerance"):], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    dump = sub.add_parser("dump", help="run the reference path and write golden tensors")
    hf = sub.add_parser("hf", help="compare transformers' eager forward with ours, tensor by tensor")
    for p in (dump, hf):
        p.add_argument("--model", required=True, help="model directory (config.json, *.safetensors)")
        src = p.add_mutually_exclusive_group(required=p is dump)  # hf without either: fixed random ids
        src.add_argument("--data", help=".jsonl records, tokenised with the model's tokenizer")
        src.add_argument("--ids", help='token ids, "1 2 3"; several sequences of one length: "1 2, 3 4"')
        p.add_argument("--samples", type=int, default=2, help="sequences (--data: the first N records)")
        p.add_argument("--seq-len", type=int, default=16, help="at most this many tokens per sequence")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
    dump.add_argument("--adapter", help="adapter directory written by train.py, applied on top")
    dump.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the run")
    dump.add_argument("--grad", action="store_true", help="also d loss / d each adapter tensor (needs --adapter)")
    dump.add_argument("--out", required=True, help="the golden .safetensors file to write")
    cmp = sub.add_parser("compare", help="compare a file of tensors with a golden file, in forward order")
    cmp.add_argument("golden", help="golden file from `verify.py dump`")
    cmp.add_argument("theirs", help="safetensors file with (some of) the same names, from your implementation")
    args = ap.parse_args(argv)
    if args.cmd != "compare" and (args.samples < 1 or args.seq_len < 2):
        ap.error("--samples must be at least 1 and --seq-len at least 2")
    if args.cmd == "dump" and args.grad and args.adapter is None:
        ap.error("--grad needs --adapter (the gradients recorded are the adapter tensors')")
    return args


def input_ids(args, cfg):
    """(B, T) ids from --ids or --data (cut to the shortest sequence: no padding), else fixed random ids."""
    if args.ids is None and args.data is None:  # the same on every run
        seed = torch.Generator().manual_seed(0)
        return torch.randint(3, cfg.vocab_size, (args.samples, args.seq_len), generator=seed)
    if args.ids is not None:
        where, seqs = f"--ids {args.ids!r}", [part.split() for part in args.ids.split(",")]
        if not all(x.isdigit() for s in seqs for x in s) or len({len(s) for s in seqs}) != 1:
            raise ValueError(f"{where}: need integers, every sequence as long")
    else:
        where, records = args.data, data.read_jsonl(args.data)
        data.check_records(records, args.data)
        tok = tokenizer.load(args.model)
        seqs = [data.encode_example(tok, r, args.seq_len)[0] for r in records[: args.samples]]
    T = min(map(len, seqs), default=0)
    if T < 2:
        raise ValueError(f"{where}: need at least 2 tokens in every sequence")
    ids = torch.tensor([[int(x) for x in s[:T]] for s in seqs])  # (B, T)
    if ids.max() >= cfg.vocab_size:
        raise ValueError(f"{where}: token id {int(ids.max())} >= vocab_size {cfg.vocab_size}")
    return ids


def reference(args, dtype, adapter=None, grad=False):
    """(config, ids, golden tensors): moe.py's plain path (the loop over experts, no fused kernels) on the ids."""
    device = hub.pick_device(args.device)
    model = hub.load_model(args.model, dtype=dtype, device=device)
    if adapter is not None:
        methods.load_adapter(model, adapter)  # refuses an adapter made for another base
    model.set_plain(True)
    ids = input_ids(args, model.config).to(device)
    return model.config, ids, collect(model, model.config, ids, grad=grad)


def run_dump(args):
    if os.path.isdir(args.out) or not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise OSError(f"{args.out}: not a file in an existing directory")
    cfg, ids, tensors = reference(args, getattr(torch, args.dtype), args.adapter, args.grad)
    write_golden(args.out, tensors, make_header(tensors, cfg, model=args.model, adapter=args.adapter))
    print(f"verify: wrote {len(tensors)} tensors ({os.path.getsize(args.out) / 2**20:.1f} MiB; {ids.shape[0]} x "
          f"{ids.shape[1]} tokens, {cfg.model_type}, {args.dtype}) to {args.out}")
    return 0


def run_compare(args):
    golden, header = read_tensors(args.golden, need_header=True)
    return report(golden, read_tensors(args.theirs)[0], header, args.golden, args.theirs)


def run_hf(args):
    try:
        import transformers
    except ImportError:
        raise ValueError("verify.py hf needs transformers (pip install transformers)") from None
    cfg, ids, golden = reference(args, torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager",
                                                           experts_implementation="eager", dtype=torch.float32)
    theirs = collect(hf.to(ids.device).eval(), cfg, ids)
    return report(golden, theirs, make_header(golden, cfg), "moe.py", f"transformers {transformers.__version__}")


def main(argv=None):
    args = parse_args(argv)
    try:  # exit 0: no divergence (or written); 1: a divergence; 2: bad input
        sys.exit({"dump": run_dump, "compare": run_compare, "hf": run_hf}[args.cmd](args))
    except (ValueError, OSError) as e:  # ConfigError, CheckpointError, AdapterError, DataError are ValueErrors
        print(f"verify: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
