"""study.py: the embedded default job, and a miniature reproduction of the papers' tables.

    python train.py                     # = python study.py --default: the main job on the shipped model
    python study.py --task arc_easy --seeds 3 --methods attn,lora,sieve,random,budget,perft-r,perft-e,dmep

For each method and seed it fine-tunes the base model with train.py (in-process, same flags for all),
evaluates multiple-choice accuracy on the task's validation slice with eval.py, and prints, next to each
claim of the seed papers (MoE-Sieve, PERFT, DMEP), the measured counterpart: trainable parameters and
adapter size relative to full LoRA, training time, accuracy as mean ± std over seeds, the paired
difference to full LoRA with a 95% t-interval, random vs sieve at the same budget, greedy budget vs
uniform top-k. Everything it writes goes under --out (runs/study by default).
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

import checkpoint
import data
import eval as evaluation
import hub
import lora
import train

HERE = os.path.dirname(os.path.abspath(__file__))
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # t(0.975, df)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Methods x seeds on a base model and a multiple-choice task.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--default", action="store_true", help="the embedded default job (what `python train.py` runs)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps and records (CI)")
    ap.add_argument("--model", default=os.path.join(HERE, "model"), help="base checkpoint directory")
    ap.add_argument("--task", default="arc_easy", help="task name: reads tasks/<task>.train.jsonl and .val.jsonl")
    ap.add_argument("--tasks-dir", default=os.path.join(HERE, "tasks"), help="where the task slices are")
    ap.add_argument("--methods", default="attn,lora,sieve,random,budget,coverage,perft-s,perft-r,perft-e,dmep",
                    help="comma-separated train.py methods")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method (0, 1, ...)")
    ap.add_argument("--steps", type=int, default=120, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N validation records")
    ap.add_argument("--out", default=os.path.join("runs", "study"), help="output directory")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--report", default=None, help="print the table and claims again from a study's JSON (no runs)")
    args = ap.parse_args(argv)
    for flag, ok in (("seeds", args.seeds >= 1), ("steps", args.steps >= 1), ("batch-size", args.batch_size >= 1),
                     ("rank", args.rank >= 1), ("lr", args.lr > 0), ("limit", args.limit is None or args.limit >= 1)):
        if not ok:
            ap.error(f"--{flag} has an invalid value: {getattr(args, flag.replace('-', '_'))}")
    if args.default:
        args.methods, args.seeds = "attn,lora,sieve,random", 1
    if args.quick:
        args.steps, args.limit, args.batch_size = 3, 16, 4
    return args


def fine_tune(args, method, seed, train_file, out):
    flags = ["--model", args.model, "--data", train_file, "--method", method, "--rank", args.rank, "--steps", args.steps,
             "--batch-size", args.batch_size, "--lr", args.lr, "--seed", seed, "--out", out, "--seq-len", 256,
             "--log-every", max(1, args.steps // 4), "--calib-samples", 256, "--warmup", 0.1]
    if args.device:
        flags += ["--device", args.device]
    if train.main([str(f) for f in flags]) != 0:
        raise RuntimeError(f"study: train.py --method {method} --seed {seed} failed")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:  # one process's own step times: not skewed by other runs
        summary["step_s"] = statistics.median(json.loads(line)["step_s"] for line in f)
    return summary


def accuracy(args, tok, records, adapter=None):
    model = hub.load_model(args.model, dtype=torch.float32, device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if adapter:
        lora.load_adapter(model, adapter)
    return evaluation.multiple_choice(model, tok, records, batch_size=32, seq_len=512)


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_interval(xs, ys):
    """Mean of the paired differences xs - ys (same seeds) and its 95% t-interval half-width."""
    d = [x - y for x, y in zip(xs, ys)]
    if len(d) < 2:
        return statistics.mean(d), float("nan")
    return statistics.mean(d), T975.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        try:
            with open(args.report) as f:
                res = json.load(f)
            args.task, args.seeds, args.steps, args.rank = res["task"], res["seeds"], res["steps"], res.get("rank", args.rank)
            base, runs = res["base"], res["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, not a study's result
            print(f"study: error: --report {args.report}: not a study result ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        report(args, base, runs)
        return 0
    train_file = os.path.join(args.tasks_dir, f"{args.task}.train.jsonl")
    val_file = os.path.join(args.tasks_dir, f"{args.task}.val.jsonl")
    try:
        methods = args.methods.split(",")
        for m in methods:
            if m not in lora.METHODS:
                raise ValueError(f"--methods: {m!r} is not one of {', '.join(lora.METHODS)}")
        val = data.read_jsonl(val_file)[: args.limit]
        evaluation.check_task(val, "mc", val_file)
        tok = data.load_tokenizer(args.model)
        base = accuracy(args, tok, val)
        print(f"study: base model {args.model}: acc {base['acc']:.3f} acc_norm {base['acc_norm']:.3f} gold nll/char "
              f"{base['gold_nll']:.3f} on {len(val)} records of {args.task}")
        runs = {}
        for m in methods:
            for seed in range(args.seeds):
                out = os.path.join(args.out, args.task, m, f"seed{seed}")
                t0 = time.time()
                s = fine_tune(args, m, seed, train_file, out)
                res = accuracy(args, tok, val, out)
                runs.setdefault(m, []).append(dict(seed=seed, acc=res["acc"], acc_norm=res["acc_norm"], nll=res["gold_nll"],
                                                   params=s["trainable_params"], adapter_bytes=s["adapter_bytes"],
                                                   train_s=s["wall_s"], total_s=round(time.time() - t0, 1),
                                                   step_s=s["step_s"], device=s["device"],
                                                   **{k: s[k] for k in ("trainable_before_prune", "tok_s_before_prune",
                                                                        "tok_s_after_prune") if k in s}))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    table = report(args, base, runs)
    os.makedirs(args.out, exist_ok=True)
    result = dict(task=args.task, model=args.model, steps=args.steps, seeds=args.seeds, rank=args.rank, base=base,
                  runs=runs, table=table)
    path = os.path.join(args.out, f"{args.task}.json")
    checkpoint.write_json(path, result)
    print(f"\nwrote {path} (the table and every run's numbers) and each run under {os.path.join(args.out, args.task)}"
          f"/METHOD/seedN (adapter, log.jsonl, loss.png, summary.json)\nprint it again: python study.py --report {path}")
    return 0


def ci(half_width, digits):  # " [±x]", or nothing with one seed (no interval)
    return "" if math.isnan(half_width) else f" [±{half_width:.{digits}f}]"


def report(args, base, runs):
    """Print the comparison table and the claims; return the table rows."""
    ref = runs.get("lora")
    rows = []
    print(f"\n{args.task}: {args.seeds} seed(s), {args.steps} steps, r={args.rank}; base acc {base['acc']:.3f}, "
          f"gold nll/char {base['gold_nll']:.4f}")
    print(f"{'method':<10}{'trainable':>12}{'vs lora':>9}{'adapter MB':>12}{'train s':>9}{'acc':>16}{'acc_norm':>10}"
          f"{'acc - lora [95% CI]':>26}{'nll/char':>10}{'nll - lora [95% CI]':>24}")
    for m, rs in runs.items():
        acc, sd = mean_std([r["acc"] for r in rs])
        row = dict(method=m, params=rs[0]["params"], adapter_mb=round(rs[0]["adapter_bytes"] / 2**20, 3),
                   train_s=round(statistics.mean(r["train_s"] for r in rs), 1), acc=round(acc, 4), acc_std=round(sd, 4),
                   acc_norm=round(statistics.mean(r["acc_norm"] for r in rs), 4),
                   nll=round(statistics.mean(r["nll"] for r in rs), 4))
        rel = f"{row['params'] / ref[0]['params']:.1%}" if ref else "-"
        diff = ndiff = "-"
        if ref and m != "lora":
            d, hw = paired_interval([r["acc"] for r in rs], [r["acc"] for r in ref])
            row["diff_vs_lora"], row["diff_ci95"] = round(d, 4), round(hw, 4)
            diff = f"{100 * d:+.1f} pp{ci(100 * hw, 1)}"
            d, hw = paired_interval([r["nll"] for r in rs], [r["nll"] for r in ref])
            row["nll_diff_vs_lora"], row["nll_diff_ci95"] = round(d, 4), round(hw, 4)
            ndiff = f"{d:+.4f}{ci(hw, 4)}"
        rows.append(row)
        print(f"{m:<10}{row['params']:>12,}{rel:>9}{row['adapter_mb']:>12.3f}{row['train_s']:>9.1f}"
              f"{acc:>10.3f}{f' ±{sd:.3f}' if len(rs) > 1 else '  (n=1)'}{row['acc_norm']:>10.3f}{diff:>26}{row['nll']:>10.4f}{ndiff:>24}")
    claims(runs)
    return rows


def claims(runs):
    """The seed papers' claims next to what this run measured (where both sides were run)."""

    def vs(a, b):  # accuracy and the continuous signal, a minus b, paired over seeds, with 95% intervals
        if min(len(runs[a]), len(runs[b])) < 3:  # one or two seeds: no interval worth a verdict
            return f"needs >= 3 seeds (have {min(len(runs[a]), len(runs[b]))})"
        da, ha = paired_interval([r["acc"] for r in runs[a]], [r["acc"] for r in runs[b]])
        dn, hn = paired_interval([r["nll"] for r in runs[a]], [r["nll"] for r in runs[b]])
        return f"{100 * da:+.1f} pp{ci(100 * ha, 1)} (gold nll/char {dn:+.4f}{ci(hn, 4)})"
    par = {m: rs[0]["params"] for m, rs in runs.items()}
    t = {m: statistics.median(r["step_s"] for r in rs) if all("step_s" in r for r in rs) else None
         for m, rs in runs.items()}
    print("\nclaims (paper -> measured here):")
    if "sieve" in runs and "lora" in runs:
        print(f"  MoE-Sieve: top-25% within ±1 pp of full LoRA -> {vs('sieve', 'lora')}")
        print(f"  MoE-Sieve: ~70-73% fewer trainable parameters -> {100 * (1 - par['sieve'] / par['lora']):.1f}% fewer")
        if t["sieve"] and t["lora"]:  # median per-step time of one process, not wall time of runs sharing a machine
            print(f"  MoE-Sieve: up to 50% less training time -> {100 * (1 - t['sieve'] / t['lora']):.1f}% less per step "
                  f"(median step {t['sieve']:.3f}s vs {t['lora']:.3f}s on {runs['sieve'][0].get('device', '?')})")
    if "random" in runs and "sieve" in runs:
        print(f"  MoE-Sieve: random 25% about 2.5 pp worse than top-25% -> {vs('random', 'sieve')}")
    if "budget" in runs and "sieve" in runs:
        print(f"  MoE-Sieve: greedy budget no consistent gain over uniform top-k -> {vs('budget', 'sieve')}")
    for m in ("perft-r", "perft-e", "perft-s"):
        if m in runs and "attn" in runs:
            print(f"  PERFT: routed adapters beat plain PEFT by 2.3-5.7 pp -> {m} vs attn: {vs(m, 'attn')} "
                  f"with {par[m]:,} vs {par['attn']:,} parameters")
    if "dmep" in runs:
        rs = runs["dmep"]
        cut = statistics.mean(1 - r["params"] / r["trainable_before_prune"] for r in rs)
        timed = [r for r in rs if r["tok_s_before_prune"] and r["tok_s_after_prune"]]  # None: too few steps
        print(f"  DMEP: 35-43% fewer trainable parameters after pruning -> {100 * cut:.1f}% fewer")
        if timed:
            speed = statistics.mean(r["tok_s_after_prune"] / r["tok_s_before_prune"] - 1 for r in timed)
            print(f"  DMEP: ~10% more throughput after pruning -> {100 * speed:+.1f}% (CPU timings of a tiny model are noisy)")


if __name__ == "__main__":
    sys.exit(main())
