"""Routing profile of a MoE model on a calibration set: how often each (layer, expert) is chosen.

Follows MoE-Sieve's public profiling code (src/profiler.py ProfilerEngine, src/utils_profiling.py make_profile):
`calibration` shuffles the records with a seed, takes N, skips texts under 10 characters and encodes each whole
text as the tokenizer does (BOS as it adds it, no EOS appended), truncated to 2048 tokens; `profile` runs them
through the frozen model, takes each router's own top-k (softmax in fp32, top-k with the model's k, as
moe.route does) of every non-padding token, and accumulates per MoE layer and expert
    counts[l][e]  how many real tokens have e in their top-k   (the score sieve.py selects by)
    mass[l][e]    the sum of those tokens' top-k weights for e (after renormalisation, where the model does it)
Layers keep their real indices: Qwen's dense layers have no router and are skipped, not renumbered.

Statistics per layer (and their mean over layers), as MoE-Sieve's Table 2 defines them:
    cv         std / mean of the layer's counts, population std (the paper's numbers: layer CV 0.869 for
               OLMoE-1B-7B); cv_sample with the sample std (the companion notebook's torch default: 0.876)
    cold       share of experts whose count is below COLD_FRACTION (half) of the uniform share total/E
    cov25      share of the layer's assignments that go to its top floor(E/4) experts (at least 1)
    entropy    entropy of the count distribution / log E; 1 = uniform
and over the whole model, global_cv (global_cv_sample): the CV of the counts summed over layers per expert
(the paper's global CV 0.216 for OLMoE-1B-7B; the notebook's 0.218).

    python router_profile.py --model DIR --data calib.jsonl --out profile.json --plot profile.png
"""
import argparse
import json
import math
import os
import random
import sys
import time

import torch

import sieve
from files import atomic, chat, data, hub, plots
from files import tokenizer

COLD_FRACTION = 0.5  # cold: count < 0.5 * total / E (MoE-Sieve Table 2; companion notebook, routing_stats)
# MoE-Sieve's OLMoE-1B-7B numbers (paper Table 2, means over its 10 calibration datasets), printed next to ours;
# the companion notebook recomputes the two CVs with the sample std: 0.876 and 0.218
PAPER_OLMOE = {"cv": 0.869, "global_cv": 0.216, "cold": 0.285, "cov25": 0.530}
CALIB_SEED, CALIB_TOKENS, MIN_CHARS = 123, 2048, 10  # scripts/profiling.py --seed; make_profile seq_len, len(text) < 10

# ----------------------------------------------------------------------------- calibration data


def calibration(tok, records, samples=None, seq_len=CALIB_TOKENS, seed=CALIB_SEED):
    """Token ids of the calibration sequences, sampled as MoE-Sieve's make_profile: the records shuffled with
    `seed` (Python's random, not the datasets library's permutation: the same rule, other draws), the first
    `samples` (None: all), texts under 10 characters skipped, each whole text encoded as the tokenizer does
    (BOS if it adds one, no EOS) and truncated from the right to `seq_len` tokens."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    chosen = [records[i] for i in order[:samples]]
    encode = lambda rec, t: chat.encode_rendered(tok, t)[0] if "messages" in rec else tok.encode(t)  # chat: as rendered
    return [encode(r, t)[:seq_len] for r, t in ((r, data.record_text(r, tok)) for r in chosen) if len(t) >= MIN_CHARS]


# ----------------------------------------------------------------------------- profile


def padded_batches(seqs, pad_id, size):
    """The calibration sequences in padded batches of `size` (every token counted: mask 1), as profile takes them."""
    return (data.pad_batch(seqs[i:i + size], [[1] * len(s) for s in seqs[i:i + size]], pad_id)
            for i in range(0, len(seqs), size))


@torch.no_grad()  # the profile needs no gradient: with autograd on, every batch's graph would stay tied to `mass`
def profile(model, batches, device=None, on_batch=None):
    """Counts and mass per (MoE layer, expert) over `batches` of (input_ids, attention_mask[, ...]) (mask may
    be None). Positions follow the mask (as in HF generation), so left and right padding route alike.
    `on_batch(rows, tokens)` is called after each batch. Returns the JSON-ready profile dict, statistics included.
    Runs without autograd whatever the caller's mode (train.py profiles before it freezes the base)."""
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


def cv(counts, sample=False):
    """std / mean of a list of counts: population std (MoE-Sieve's Table 2) or sample std (its notebook)."""
    c = torch.tensor(counts, dtype=torch.float64)
    if c.numel() < 2 or c.sum() <= 0:
        return 0.0
    return c.std(correction=1 if sample else 0).item() / c.mean().item()


def stats(p):
    """Per-layer cv, cv_sample, cold, cov25, entropy of the counts (module docstring), their means over layers,
    and the global CV of the counts summed over layers."""
    per_layer = []
    for layer, row in zip(p["layers"], p["counts"]):
        c = torch.tensor(row, dtype=torch.float64)  # (E,)
        E, total = c.numel(), c.sum().item()
        if total <= 0:
            raise ValueError(f"profile: layer {layer} has no routed tokens")
        q = c / total
        ent = -(q[q > 0] * q[q > 0].log()).sum().item()
        top = torch.sort(c, descending=True).values[: max(1, E // 4)]
        per_layer.append({
            "layer": layer, "cv": cv(row), "cv_sample": cv(row, sample=True),
            "cold": (c < COLD_FRACTION * total / E).double().mean().item(),
            "cov25": top.sum().item() / total,
            "entropy": ent / math.log(E) if E > 1 else 1.0,
        })
    keys = ("cv", "cv_sample", "cold", "cov25", "entropy")
    means = {k: sum(s[k] for s in per_layer) / len(per_layer) for k in keys}
    summed = torch.tensor(p["counts"], dtype=torch.float64).sum(0).tolist()  # (E,) over layers
    return {"per_layer": per_layer, "mean": means, "global_cv": cv(summed), "global_cv_sample": cv(summed, sample=True),
            "cold_rule": f"count < {COLD_FRACTION} * layer total / num_experts"}


def format_stats(s):
    lines = [f"{'layer':>6} {'CV':>7} {'CV(n-1)':>8} {'cold %':>7} {'cov@25%':>8} {'entropy':>8}"]
    rows = [(str(x["layer"]), x) for x in s["per_layer"]] + [("mean", s["mean"])]
    for name, x in rows:
        lines.append(f"{name:>6} {x['cv']:7.3f} {x['cv_sample']:8.3f} {100 * x['cold']:7.1f} {100 * x['cov25']:8.1f} "
                     f"{x['entropy']:8.3f}")
    lines.append(f"global CV {s['global_cv']:.3f} (sample std {s['global_cv_sample']:.3f})")
    P = PAPER_OLMOE
    lines.append(f"MoE-Sieve paper, OLMoE-1B-7B (Table 2): layer CV {P['cv']:.3f}, global CV {P['global_cv']:.3f}, "
                 f"cold {100 * P['cold']:.1f}%, cov@25% {100 * P['cov25']:.1f}% (CVs with the population std)")
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
    atomic.write_text(path, _dumps(p) + "\n")


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


# ----------------------------------------------------------------------------- CLI


def compare_tasks(model, tok, tasks, out):
    """Each task's routing profile on its records (as the sieve's calibration: 256 records), its statistics, and
    the Jaccard overlap |A & B| / |A | B| of the tasks' top-25% expert sets per layer: does each task heat its own
    experts? tasks: {name: records}. Prints the tables; writes out/routing.json and out/routing_overlap.png."""
    profiles, top = {}, {}
    print(f"{'task':<10}{'tokens':>8}{'CV':>7}{'cold %':>8}{'cov@25%':>9}   top-25% experts per layer")
    for name, records in tasks.items():
        seqs = sorted(calibration(tok, records, 256), key=len)
        p = profiles[name] = profile(model, padded_batches(seqs, tok.pad_id, 32))
        top[name] = sieve.topk_plan(p, 0.25)
        m = p["stats"]["mean"]
        print(f"{name:<10}{p['tokens']:>8,}{m['cv']:>7.3f}{100 * m['cold']:>8.1f}{100 * m['cov25']:>9.1f}   "
              + " | ".join(",".join(map(str, e)) for e in top[name].values()))
    names, layers = list(profiles), list(next(iter(top.values())))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    jac = {f"{a}/{b}": [len(set(top[a][l]) & set(top[b][l])) / len(set(top[a][l]) | set(top[b][l])) for l in layers]
           for a, b in pairs}
    n_exp, k = len(p["counts"][0]), len(next(iter(top[names[0]].values())))
    print(f"\nJaccard of the top-25% sets per layer (1 = the same experts; two random sets of {k} of {n_exp}: "
          f"{random_jaccard(k, n_exp):.2f} expected)")
    print(f"{'pair':<16}" + "".join(f"{'L' + str(l):>7}" for l in layers) + f"{'mean':>7}")
    for pair, js in jac.items():
        print(f"{pair:<16}" + "".join(f"{j:>7.2f}" for j in js) + f"{sum(js) / len(js):>7.2f}")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "routing.json")
    text = json.dumps(dict(stats={n: p["stats"] for n, p in profiles.items()},
                           top25={n: {str(k): v for k, v in t.items()} for n, t in top.items()},
                           jaccard=jac, counts={n: p["counts"] for n, p in profiles.items()}), indent=1)
    atomic.write_text(path, text)
    written = [f"{path} (each task's statistics, top-25% sets, counts; the Jaccard overlaps)"]
    png = os.path.join(out, "routing_overlap.png")
    if jac and plots.heatmap(png, list(jac.values()), "Jaccard overlap of the tasks' top-25% experts", "MoE layer",
                             "task pair", list(jac), "Jaccard"):
        written.append(f"{png} (the overlaps as a heatmap)")
    return written


def random_jaccard(k, n):
    """The expected Jaccard overlap of two independent uniformly random k-subsets of n experts."""
    total = 0.0
    for i in range(k + 1):  # i shared experts: hypergeometric probability, overlap i / (2k - i)
        total += math.comb(k, i) * math.comb(n - k, k - i) / math.comb(n, k) * i / (2 * k - i)
    return total


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # inputs and outputs
    hub.add_model_flags(ap)
    ap.add_argument("--data", required=True, help="calibration .jsonl (text, prompt, mc or qa records)")
    ap.add_argument("--out", required=True, help="where to write the profile JSON")
    ap.add_argument("--plot", default=None, help="also write a layers x experts heatmap PNG here (needs matplotlib)")
    # how much to run
    ap.add_argument("--samples", type=int, default=None, help="profile N records drawn at random (default: all)")
    ap.add_argument("--seed", type=int, default=CALIB_SEED, help="seed of the shuffle that draws the records")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--seq-len", type=int, default=CALIB_TOKENS, help="truncate each record to this many tokens")
    ap.add_argument("--plan-frac", type=float, default=None,
                    help="outline on the heatmap the experts sieve's top-k plan picks at this fraction (e.g. 0.25)")
    args = ap.parse_args(argv)
    if args.plan_frac is not None and not 0 < args.plan_frac <= 1:
        ap.error(f"--plan-frac {args.plan_frac}: a fraction of the experts must be in (0, 1]")
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
    if not os.path.isdir(args.model):
        raise OSError(f"{args.model}: model directory not found")
    tok = tokenizer.load(args.model)
    seqs = calibration(tok, records, args.samples, args.seq_len, args.seed)
    if not seqs:
        raise ValueError(f"{args.data}: no record has a text of at least {MIN_CHARS} characters to profile")
    seqs.sort(key=len)  # less padding; the profile does not depend on the order
    # ---- model
    device = hub.pick_device(args.device)
    dtype = hub.pick_dtype(args.dtype, device)
    model = hub.load_model(args.model, dtype=dtype, device=device)
    cfg = model.config
    top = max(max(s) for s in seqs)
    if top >= cfg.vocab_size:
        raise ValueError(f"{args.model}: the tokenizer produced id {top} >= the model's vocab_size {cfg.vocab_size}")
    print(f"router_profile: {cfg.model_type}, {sum(map(cfg.is_moe_layer, range(cfg.num_hidden_layers)))} MoE layers "
          f"x {cfg.num_experts} experts, top-{cfg.num_experts_per_tok}; dtype {next(model.parameters()).dtype}, "
          f"device {device}; {len(seqs)} samples, {sum(map(len, seqs)):,} tokens")
    # ---- profile
    batches = padded_batches(seqs, tok.pad_id, args.batch_size)
    t0, done, toks, next_report = time.time(), 0, 0, 0.1

    def progress(rows, n):
        nonlocal done, toks, next_report
        done, toks = done + rows, toks + n
        if done / len(seqs) >= next_report or done == len(seqs):  # one line per ~10%
            print(f"  {done}/{len(seqs)} samples, {toks / (time.time() - t0):,.0f} tok/s", flush=True)
            next_report = math.floor(10 * done / len(seqs)) / 10 + 0.1

    p = profile(model, batches, device, on_batch=progress)
    # ---- save
    print(format_stats(p["stats"]))
    save_profile(p, args.out)
    print(f"router_profile: wrote {args.out} (counts and mass per layer and expert, the statistics)")
    plan = None
    if args.plan_frac is not None:
        plan = sieve.topk_plan(p, args.plan_frac)
    if args.plot and plots.routing(p, args.plot, plan):
        print(f"router_profile: wrote {args.plot} (the heatmap)")
    print(f"next: python train.py --model {args.model} --data TRAIN.jsonl --method sieve --profile {args.out} --out RUN")


if __name__ == "__main__":
    main()
