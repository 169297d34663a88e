"""Routing profile of a MoE model on a calibration set: how often each (layer, expert) is chosen.

Follows MoE-Sieve's public profiling code (DESIGN.md §5): run calibration text through the frozen model,
take each router's own top-k (softmax in fp32, top-k with the model's k, as moe.route does), mask the
padding, and accumulate per MoE layer and expert
    counts[l][e]  how many real tokens have e in their top-k   (the score sieve.py selects by)
    mass[l][e]    the sum of those tokens' top-k weights for e (after renormalisation, where the model does it)
Layers keep their real indices: Qwen's dense layers have no router and are skipped, not renumbered.

Statistics per layer (and their mean over layers):
    cv        std / mean of the counts (sample std, as MoE-Sieve's code: torch's default); 0 = balanced
    cold      share of experts whose count is below COLD_FRACTION (half) of the uniform share total/E
    cov25     share of the layer's assignments that go to its top ceil(E/4) experts
    entropy   entropy of the count distribution / log E; 1 = uniform

    python router_profile.py --model DIR --data calib.jsonl --out profile.json --plot profile.png
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import data
import hub
import lora

COLD_FRACTION = 0.5  # cold: count < 0.5 * total / E (MoE-Sieve's companion notebook, its Table 2)
# MoE-Sieve's OLMoE-1B-7B numbers, printed next to ours: layer CV 0.876, cold 28.5%, coverage@25% 53.0%
PAPER_OLMOE = {"cv": 0.876, "cold": 0.285, "cov25": 0.530}

# ----------------------------------------------------------------------------- profile


@torch.no_grad()
def profile(model, batches, device=None, on_batch=None):
    """Counts and mass per (MoE layer, expert) over `batches` of (input_ids, attention_mask[, ...]) (mask may
    be None). Positions follow the mask (as in HF generation), so left and right padding route alike.
    `on_batch(rows, tokens)` is called after each batch. Returns the JSON-ready profile dict, statistics included."""
    cfg = model.config
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    E = cfg.num_experts
    counts = torch.zeros(len(layers), E, dtype=torch.long, device=device)  # (L, E)
    mass = torch.zeros(len(layers), E, dtype=torch.float64, device=device)  # (L, E)
    tokens = samples = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            ids = batch[0].to(device)
            mask = torch.ones_like(ids) if batch[1] is None else batch[1].to(device)  # (B, T)
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) positions of the real tokens
            _, routing = model(ids, mask, pos, return_routing=True, hidden=True)
            if [r.layer for r in routing] != layers:
                raise RuntimeError(f"model returned routing for layers {[r.layer for r in routing]}, expected {layers}")
            real = mask.reshape(-1).bool()  # (N,)
            for i, r in enumerate(routing):
                idx = r.topk_idx[real].reshape(-1)  # (n*K,) experts chosen by real tokens
                counts[i] += torch.bincount(idx, minlength=E)
                mass[i].index_add_(0, idx, r.topk_w[real].reshape(-1).double())
            n = int(real.sum())
            tokens, samples = tokens + n, samples + ids.shape[0]
            if on_batch is not None:
                on_batch(ids.shape[0], n)
    finally:
        model.train(was_training)
    p = {"model_type": cfg.model_type, "num_experts": E, "top_k": cfg.num_experts_per_tok, "layers": layers,
         "counts": counts.tolist(), "mass": mass.tolist(), "tokens": tokens, "samples": samples,
         "cold_threshold": COLD_FRACTION}
    p["stats"] = stats(p) if tokens > 0 else None
    return p


def stats(p):
    """Per-layer cv, cold, cov25, entropy of the counts (module docstring), and their means over layers."""
    per_layer = []
    for layer, row in zip(p["layers"], p["counts"]):
        c = torch.tensor(row, dtype=torch.float64)  # (E,)
        E, total = c.numel(), c.sum().item()
        if total <= 0:
            raise ValueError(f"profile: layer {layer} has no routed tokens")
        mean = total / E
        q = c / total
        ent = -(q[q > 0] * q[q > 0].log()).sum().item()
        top = torch.sort(c, descending=True).values[: math.ceil(0.25 * E)]
        per_layer.append({
            "layer": layer,
            "cv": c.std(correction=1).item() / mean if E > 1 else 0.0,
            "cold": (c < COLD_FRACTION * mean).double().mean().item(),
            "cov25": top.sum().item() / total,
            "entropy": ent / math.log(E) if E > 1 else 1.0,
        })
    keys = ("cv", "cold", "cov25", "entropy")
    means = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in keys}
    return {"per_layer": per_layer, "mean": means,
            "cold_rule": f"count < {COLD_FRACTION} * layer total / num_experts"}


def format_stats(s):
    lines = [f"{'layer':>6} {'CV':>7} {'cold %':>7} {'cov@25%':>8} {'entropy':>8}"]
    rows = [(str(x["layer"]), x) for x in s["per_layer"]] + [("mean", s["mean"])]
    for name, x in rows:
        lines.append(f"{name:>6} {x['cv']:7.3f} {100 * x['cold']:7.1f} {100 * x['cov25']:8.1f} {x['entropy']:8.3f}")
    P = PAPER_OLMOE
    lines.append(f"MoE-Sieve paper, OLMoE-1B-7B: CV {P['cv']:.3f}, cold {100 * P['cold']:.1f}%, cov@25% {100 * P['cov25']:.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files

REQUIRED = ("model_type", "num_experts", "top_k", "layers", "counts", "mass", "tokens")


def _dumps(v, ind=""):
    """JSON with each innermost list or flat dict on one line (a matrix row, one layer's statistics)."""
    items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
    if all(not isinstance(x, (dict, list)) for x in items):
        return json.dumps(v)
    inner = ind + "  "
    if isinstance(v, dict):
        body = [f"{inner}{json.dumps(str(k))}: {_dumps(x, inner)}" for k, x in v.items()]
        return "{\n" + ",\n".join(body) + f"\n{ind}}}"
    return "[\n" + ",\n".join(inner + _dumps(x, inner) for x in v) + f"\n{ind}]"


def save_profile(p, path):
    """Write the profile as JSON (one matrix row per line), atomically."""
    text = _dumps(p) + "\n"

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    lora.atomic_write(path, write)


def load_profile(path):
    """Read a profile written by save_profile; ValueError naming the file if it is missing or malformed."""
    path = str(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: routing profile not found (make one with router_profile.py)")
    try:
        with open(path) as f:
            p = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid routing profile ({e})") from None
    if not isinstance(p, dict) or any(k not in p for k in REQUIRED):
        missing = [k for k in REQUIRED if not isinstance(p, dict) or k not in p]
        raise ValueError(f"{path}: not a routing profile (missing {missing})")
    L, E = len(p["layers"]), p["num_experts"]
    for k in ("counts", "mass"):
        if len(p[k]) != L or any(len(row) != E for row in p[k]):
            raise ValueError(f"{path}: '{k}' must be {L} rows (one per layer in 'layers') of {E} numbers")
    return p


def plot_heatmap(p, path):
    """Layers x experts heatmap of counts / uniform share, each row sorted descending; PNG, written atomically.
    Needs matplotlib (an optional dependency): without it, print a note and return False."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    except ImportError:
        print(f"router_profile: matplotlib is not installed, skipping the heatmap {path}")
        return False
    c = torch.tensor(p["counts"], dtype=torch.float64)  # (L, E)
    rel = c / (c.sum(1, keepdim=True) / c.shape[1]).clamp(min=1)  # 1 = the uniform share
    rel = torch.sort(rel, dim=1, descending=True).values
    fig = Figure(figsize=(8, 1.5 + 0.25 * c.shape[0]))
    ax = fig.add_subplot()
    im = ax.imshow(rel.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(p["layers"])), [str(layer) for layer in p["layers"]])
    ax.set_xlabel("expert rank within the layer (by routing count)")
    ax.set_ylabel("layer")
    ax.set_title(f"{p['model_type']} routing counts / uniform share ({p['tokens']:,} tokens, top-{p['top_k']})")
    fig.colorbar(im, ax=ax, label="count / (total / E)")
    fig.tight_layout()
    lora.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # inputs and outputs
    ap.add_argument("--model", required=True, help="model directory (config.json, *.safetensors, tokenizer)")
    ap.add_argument("--data", required=True, help="calibration .jsonl (text, prompt, mc or qa records)")
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--plot", default=None, help="also write a layers x experts heatmap PNG here (needs matplotlib)")
    # how much to run
    ap.add_argument("--samples", type=int, default=None, help="use the first N records (default: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--seq-len", type=int, default=512, help="truncate each record to this many tokens")
    # where
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="model dtype (auto: the checkpoint's own)")
    args = ap.parse_args(argv)
    for flag in ("samples", "batch_size", "seq_len"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, OSError) as e:  # DataError, ConfigError, CheckpointError are ValueErrors
        print(f"router_profile: error: {e}", file=sys.stderr)
        sys.exit(1)


def run(args):
    for out in (args.out, args.plot):  # fail before the long run, not after it
        if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise OSError(f"{out}: the output directory does not exist")
        if out is not None and os.path.isdir(out):
            raise OSError(f"{out}: is a directory, not a file name")
    # ---- data
    records = data.read_jsonl(args.data)
    data.check_records(records, args.data)
    records = records[: args.samples]
    if not os.path.isdir(args.model):
        raise OSError(f"{args.model}: model directory not found")
    tok = data.load_tokenizer(args.model)
    # the whole text of each record is routed: text; prompt+completion; query+" "+gold; question+" "+answer
    seqs = [data.encode_example(tok, rec, args.seq_len)[0] for rec in records]
    seqs.sort(key=len)  # less padding; the profile does not depend on the order
    # ---- model
    device = hub.pick_device(args.device)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = hub.load_model(args.model, dtype=dtype, device=device)
    cfg = model.config
    top = max(max(s) for s in seqs)
    if top >= cfg.vocab_size:
        raise ValueError(f"{args.model}: the tokenizer produced id {top} >= the model's vocab_size {cfg.vocab_size}")
    print(f"router_profile: {cfg.model_type}, {sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))} MoE layers "
          f"x {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}; dtype {next(model.parameters()).dtype}, "
          f"device {device}; {len(seqs)} samples, {sum(map(len, seqs)):,} tokens")
    # ---- profile
    B = args.batch_size
    batches = (data.pad_batch(seqs[i:i + B], [[1] * len(s) for s in seqs[i:i + B]], tok.pad_id)
               for i in range(0, len(seqs), B))
    t0, done, toks, next_report = time.time(), 0, 0, 0.1

    def progress(rows, n):
        nonlocal done, toks, next_report
        done, toks = done + rows, toks + n
        if done / len(seqs) >= next_report or done == len(seqs):  # one line per ~10%
            print(f"  {done}/{len(seqs)} samples, {toks / (time.time() - t0):,.0f} tok/s", flush=True)
            next_report = math.floor(10 * done / len(seqs)) / 10 + 0.1

    p = profile(model, batches, device, on_batch=progress)
    # ---- save
    save_profile(p, args.out)
    print(f"router_profile: wrote {args.out}")
    if args.plot and plot_heatmap(p, args.plot):
        print(f"router_profile: wrote {args.plot}")
    print(format_stats(p["stats"]))


if __name__ == "__main__":
    main()
