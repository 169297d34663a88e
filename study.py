"""study.py: the embedded default job, and a miniature reproduction of the papers' tables.

    python train.py                     # = python study.py --default: one task, four methods, one seed (~5 min)
    python study.py                     # every method x 5 seeds on tasks max, count, index (see results/study/)
    python study.py --train my.train.jsonl --val my.val.jsonl --methods lora,sieve,random --seeds 5
    python study.py --routing --out results/study   # each task's routing and the overlap of their top-25% experts

For each task, method and seed it fine-tunes the base model with train.py (in-process, same flags for all),
evaluates multiple-choice accuracy on the task's validation records with eval.py, and prints the table
(trainable parameters, adapter size, time, accuracy as mean ± std over seeds, the paired difference to full
LoRA with a 95% t-interval) and, next to each claim of the seed papers (MoE-Sieve, PERFT, DMEP), the measured
difference, its interval and a verdict by the rule printed beside it (CLAIMS). Seeds are paired: seed s of
every method sees the same data order, so the per-seed differences cancel most of the order's noise.
Everything it writes goes under --out (runs/study by default).
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
TASKS = ("max", "count", "words")  # pretrain/tasks.py; see tasks/README.md
DEFAULT_OUT = os.path.join("runs", "study")
METHODS = ("attn", "attn@32", "lora", "sieve", "random", "budget", "coverage", "perft-s", "perft-r", "perft-e", "dmep")
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}  # t(0.975, df)


COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan", "black")

def parse_args(argv):
    ap = argparse.ArgumentParser(description="Methods x seeds on a base model and multiple-choice tasks.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--default", action="store_true", help="the embedded default job (what `python train.py` runs)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps and records (CI)")
    ap.add_argument("--reference", action="store_true", help="train and evaluate on moe.py's plain code (slow)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of every run (train.py's --dropout)")
    ap.add_argument("--model", default=os.path.join(HERE, "model"), help="base checkpoint directory")
    ap.add_argument("--tasks", "--task", default=",".join(TASKS),
                    help="task names: each reads tasks/<task>.train.jsonl and .val.jsonl")
    ap.add_argument("--tasks-dir", default=os.path.join(HERE, "tasks"), help="where the task files are")
    ap.add_argument("--train", default=None, help="your own task: a training .jsonl (formats as train.py); with --val")
    ap.add_argument("--val", default=None, help="your own task: a validation .jsonl of {query, choices, gold}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated train.py methods; METHOD@R trains "
                    "it at rank R (attn@32: attention LoRA with as many parameters as perft-e)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per method (0, 1, ...)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence (the tasks' items are short)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N validation records")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (with --report: write the merged JSONs there)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--routing", action="store_true", help="only profile each task's routing and compare the tasks' "
                    "top-25%% expert sets (table, OUT/routing.json, OUT/routing_overlap.png)")
    ap.add_argument("--report", nargs="+", default=None, help="print the tables and claims again from study JSONs "
                    "(no runs); with --plot also draw accuracy against trainable parameters")
    ap.add_argument("--plot", default=None, help="with --report: write the accuracy / parameters picture here")
    args = ap.parse_args(argv)
    for flag, ok in (("seeds", args.seeds >= 1), ("steps", args.steps >= 1), ("batch-size", args.batch_size >= 1),
                     ("rank", args.rank >= 1), ("lr", args.lr > 0), ("limit", args.limit is None or args.limit >= 1),
                     ("seq-len", args.seq_len >= 2), ("train", (args.train is None) == (args.val is None))):
        if not ok:
            ap.error(f"--{flag} has an invalid value: {getattr(args, flag.replace('-', '_'))}"
                     + (" (--train and --val go together)" if flag == "train" else ""))
    if args.default:  # about 5 minutes on two CPU cores: one task, the four MoE-Sieve methods, one seed
        args.tasks, args.methods, args.seeds, args.steps, args.limit = "max", "attn,lora,sieve,random", 1, 60, 200
        # no LoRA dropout, so that --reference gives the same run: the plain loop draws dropout masks expert by
        # expert, the grouped path for all rows at once, so with dropout the two are different random draws
        args.dropout = 0.0
    if args.quick:
        args.steps, args.limit, args.batch_size = 3, 16, 4
    return args


def task_files(args):
    """[(name, train file, val file)]: --train/--val (named after the validation file), else each of --tasks."""
    if args.train:
        return [(os.path.basename(args.val).split(".")[0], args.train, args.val)]
    return [(t, os.path.join(args.tasks_dir, f"{t}.train.jsonl"), os.path.join(args.tasks_dir, f"{t}.val.jsonl"))
            for t in args.tasks.split(",")]


def fine_tune(args, spec, seed, train_file, out):
    """One train.py run of a method spec (METHOD or METHOD@RANK); its summary plus the median step time."""
    method, _, rank = spec.partition("@")
    flags = ["--model", args.model, "--data", train_file, "--method", method, "--rank", rank or args.rank,
             "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr, "--seed", seed, "--out", out,
             "--seq-len", args.seq_len, "--log-every", max(1, args.steps // 4), "--calib-samples", 256, "--warmup", 0.1,
             "--dropout", args.dropout]
    if args.device:
        flags += ["--device", args.device]
    if args.reference:
        flags.append("--reference")
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
    model.set_reference(args.reference)
    return evaluation.multiple_choice(model, tok, records, batch_size=32, seq_len=512)


def t975(df):
    """t(0.975, df) from the table; between tabulated values the next smaller df (a slightly wider interval)."""
    return T975[max(k for k in T975 if k <= df)]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_interval(xs, ys):
    """Mean of the paired differences xs - ys (same seeds) and its 95% t-interval half-width."""
    d = [x - y for x, y in zip(xs, ys)]
    if len(d) < 2:
        return statistics.mean(d), float("nan")
    return statistics.mean(d), t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return reprint(args)
    try:
        methods = args.methods.split(",")
        for m in methods:
            if m.partition("@")[0] not in lora.METHODS or not (m.partition("@")[2] or "1").isdigit():
                raise ValueError(f"--methods: {m!r} is not one of {', '.join(lora.METHODS)} (optionally @RANK)")
        names = [name for name, _, _ in task_files(args)]
        if len(set(names)) != len(names):
            raise ValueError(f"--tasks {args.tasks}: a task is named twice")
        if args.routing:
            return routing(args)
        tok = data.load_tokenizer(args.model)
        tasks = []
        for name, train_file, val_file in task_files(args):  # every file checked before the first run
            for path in (train_file, val_file):
                if not os.path.isfile(path):
                    raise OSError(f"{path}: task file not found (--tasks {name}, or --train / --val)")
            val = data.read_jsonl(val_file)[: args.limit]
            evaluation.check_task(val, "mc", val_file)
            data.check_records(data.read_jsonl(train_file), train_file)
            tasks.append((name, train_file, val))
        for name, train_file, val in tasks:
            run_task(args, tok, name, train_file, val, methods)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    return 0


def run_task(args, tok, task, train_file, val, methods):
    """Every method x seed on one task; prints the table and the claims, writes OUT/<task>.json."""
    base = accuracy(args, tok, val)
    print(f"study: base model {args.model}: acc {base['acc']:.3f} acc_norm {base['acc_norm']:.3f} gold nll/char "
          f"{base['gold_nll']:.3f} on {len(val)} records of {task}")
    runs, t_start = {}, time.time()
    for m in methods:
        for seed in range(args.seeds):
            out = os.path.join(args.out, task, m, f"seed{seed}")
            t0 = time.time()
            s = fine_tune(args, m, seed, train_file, out)
            res = accuracy(args, tok, val, out)
            runs.setdefault(m, []).append(dict(seed=seed, acc=res["acc"], acc_norm=res["acc_norm"], nll=res["gold_nll"],
                                               params=s["trainable_params"], adapter_bytes=s["adapter_bytes"],
                                               train_s=s["wall_s"], total_s=round(time.time() - t0, 1),
                                               step_s=s["step_s"], device=s["device"],
                                               **{k: s[k] for k in ("trainable_before_prune", "tok_s_before_prune",
                                                                    "tok_s_after_prune") if k in s}))
    result = dict(task=task, model=args.model, steps=args.steps, seeds=args.seeds, rank=args.rank, n_val=len(val),
                  base=base, runs=runs, wall_s=round(time.time() - t_start), table=None, claims=None)
    result["table"], result["claims"] = report(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{task}.json")
    checkpoint.write_json(path, result)
    print(f"\nwrote {path} (the table and every run's numbers) and each run under {os.path.join(args.out, task)}"
          f"/METHOD/seedN\nprint it again: python study.py --report {path}")


def reprint(args):
    """--report: the tables and claims of saved studies; files of the same task (say, one per group of methods,
    run in parallel) are merged, their runs joined. With --plot, the picture; with --out, the merged JSONs."""
    merged = {}
    for path in args.report:
        try:
            with open(path) as f:
                res = json.load(f)
            task, runs = res["task"], res["runs"]
            res["seeds"], res["steps"], res["base"]["acc"]  # noqa: B018 (a study's result has them)
        except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, not a study's result
            print(f"study: error: --report {path}: not a study result ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
        if task in merged:
            merged[task]["runs"].update(runs)
            merged[task]["wall_s"] = merged[task].get("wall_s", 0) + res.get("wall_s", 0)  # CPU-time-like total
        else:
            merged[task] = res
    for res in merged.values():
        res["table"], res["claims"] = report(res)
        if args.out != DEFAULT_OUT:
            os.makedirs(args.out, exist_ok=True)
            checkpoint.write_json(os.path.join(args.out, f"{res['task']}.json"), res)
    if len(merged) > 1:  # the claims over every (task, seed) pair: one average over the tasks, a tighter interval
        common = [m for m in next(iter(merged.values()))["runs"] if all(m in r["runs"] for r in merged.values())]
        pooled = {m: [r for res in merged.values() for r in res["runs"][m]] for m in common}
        print(f"\nall {len(merged)} tasks pooled ({', '.join(merged)}): each (task, seed) is one pair")
        claims(pooled)
    if args.plot and plot(list(merged.values()), args.plot):
        print(f"wrote {args.plot}")
    return 0


def ci(half_width, digits):  # " [±x]", or nothing with one seed (no interval)
    return "" if math.isnan(half_width) else f" [±{half_width:.{digits}f}]"


def report(res):
    """Print one task's comparison table and the claims; return (table rows, claim rows)."""
    runs, base = res["runs"], res["base"]
    ref = runs.get("lora")
    rows = []
    print(f"\n{res['task']}: {res['seeds']} seed(s), {res['steps']} steps, r={res.get('rank', '?')}; base acc "
          f"{base['acc']:.3f}, gold nll/char {base['gold_nll']:.4f}")
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
    return rows, claims(runs)


# Each accuracy claim: (a, b, the claim, the rule on the 95% interval [lo, hi] of a - b in pp, reproduces(lo, hi),
# contradicts(lo, hi)); contradicts is tested first, neither -> inconclusive.
CLAIMS = (
    ("sieve", "lora", "MoE-Sieve: top-25% within ±1 pp of full LoRA", "reproduces: interval inside ±1 pp; "
     "contradicts: interval outside it", lambda lo, hi: -1 <= lo and hi <= 1, lambda lo, hi: hi < -1 or lo > 1),
    ("random", "sieve", "MoE-Sieve: random 25% about 2.5 pp worse than top-25%", "reproduces: interval below 0; "
     "contradicts: interval above -1 pp", lambda lo, hi: hi < 0, lambda lo, hi: lo > -1),
    ("budget", "sieve", "MoE-Sieve: greedy budget no consistent gain over uniform top-k", "contradicts: interval "
     "above 0; reproduces: interval below +1 pp", lambda lo, hi: hi <= 1, lambda lo, hi: lo > 0),
    ("perft-r", "attn", "PERFT: routed adapters beat plain PEFT (2.3-5.7 pp): PERFT-R vs attention LoRA, ~same size",
     "reproduces: interval above 0; contradicts: interval below +1 pp", lambda lo, hi: lo > 0, lambda lo, hi: hi < 1),
    ("perft-e", "attn@32", "PERFT: routed adapters beat plain PEFT (2.3-5.7 pp): PERFT-E vs attention LoRA r32, "
     "same size", "reproduces: interval above 0; contradicts: interval below +1 pp", lambda lo, hi: lo > 0,
     lambda lo, hi: hi < 1),
    ("perft-e", "attn", "PERFT: routed adapters beat plain PEFT (as in its tables, not at equal size): PERFT-E vs attn",
     "reproduces: interval above 0; contradicts: interval below +1 pp", lambda lo, hi: lo > 0, lambda lo, hi: hi < 1),
    ("dmep", "lora", "DMEP: pruned LoRA-MoE keeps full LoRA's accuracy (within ±1 pp)", "reproduces: interval inside "
     "±1 pp; contradicts: interval outside it", lambda lo, hi: -1 <= lo and hi <= 1, lambda lo, hi: hi < -1 or lo > 1),
)


def verdict(runs, a, b, rule):
    """(text, verdict) of a - b paired over seeds: 'needs >= 3 seeds' below three seeds."""
    n = min(len(runs[a]), len(runs[b]))
    if n < 3:  # one or two seeds: no interval worth a verdict
        return f"needs >= 3 seeds (have {n})", "no verdict"
    da, ha = paired_interval([r["acc"] for r in runs[a]], [r["acc"] for r in runs[b]])
    dn, hn = paired_interval([r["nll"] for r in runs[a]], [r["nll"] for r in runs[b]])
    lo, hi = 100 * (da - ha), 100 * (da + ha)
    v = "contradicts" if rule[1](lo, hi) else "reproduces" if rule[0](lo, hi) else "inconclusive"
    return f"{100 * da:+.1f} pp{ci(100 * ha, 1)} (gold nll/char {dn:+.4f}{ci(hn, 4)})", v


def claims(runs):
    """The seed papers' claims next to what this run measured (where both sides were run); returns their rows."""
    par = {m: rs[0]["params"] for m, rs in runs.items()}
    t = {m: statistics.median(r["step_s"] for r in rs) if all("step_s" in r for r in rs) else None
         for m, rs in runs.items()}
    out = []
    print("\nclaims (paper -> measured here, a - b paired over seeds, 95% t-interval -> verdict):")
    for a, b, claim, rule, repro, contra in CLAIMS:
        if a in runs and b in runs:
            text, v = verdict(runs, a, b, (repro, contra))
            print(f"  {claim} -> {a} - {b}: {text} with {par[a]:,} vs {par[b]:,} parameters -> {v}  ({rule})")
            out.append(dict(claim=claim, a=a, b=b, measured=text, verdict=v, rule=rule))
    if "sieve" in runs and "lora" in runs:
        print(f"  MoE-Sieve: ~70-73% fewer trainable parameters -> {100 * (1 - par['sieve'] / par['lora']):.1f}% fewer")
        if t["sieve"] and t["lora"]:  # median per-step time of one process, not wall time of runs sharing a machine
            print(f"  MoE-Sieve: up to 50% less training time -> {100 * (1 - t['sieve'] / t['lora']):.1f}% less per step "
                  f"(median step {t['sieve']:.3f}s vs {t['lora']:.3f}s on {runs['sieve'][0].get('device', '?')})")
    if "dmep" in runs:
        rs = runs["dmep"]
        cut = statistics.mean(1 - r["params"] / r["trainable_before_prune"] for r in rs)
        timed = [r for r in rs if r.get("tok_s_before_prune") and r.get("tok_s_after_prune")]  # None: too few steps
        print(f"  DMEP: 35-43% fewer trainable parameters after pruning -> {100 * cut:.1f}% fewer")
        if timed:
            speed = statistics.mean(r["tok_s_after_prune"] / r["tok_s_before_prune"] - 1 for r in timed)
            print(f"  DMEP: ~10% more throughput after pruning -> {100 * speed:+.1f}% (CPU timings of a tiny model are noisy)")
    return out


def plot(results, path):
    """Accuracy against trainable parameters, one panel per task, mean over seeds with 95% t-interval bars."""
    import plots
    Figure = plots.figure_class(path)  # 11 methods: matplotlib's default cycle has only 10 colours
    if Figure is None:
        return False
    fig = Figure(figsize=(4.2 * len(results), 3.8))
    for i, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for j, (m, rs) in enumerate(res["runs"].items()):  # a colour and a marker of its own for each method
            accs = [100 * r["acc"] for r in rs]
            hw = t975(len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else 0
            ax.errorbar([rs[0]["params"]], [statistics.mean(accs)], yerr=[hw], fmt="osD^v<>ph*X"[j % 11], capsize=3,
                        color=COLOURS[j % len(COLOURS)],
                        label=m)
        ax.axhline(100 * res["base"]["acc"], color="grey", linestyle="--", linewidth=1, label="base")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(f"{res['task']} ({res['seeds']} seeds, {res['steps']} steps)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    lora.atomic_write(os.fspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True


def routing(args):
    """Each task's routing profile on its training records (as the sieve's calibration), its statistics, and the
    Jaccard overlap of the tasks' top-25% expert sets per layer: does each task heat its own experts?"""
    import plots
    import router_profile
    import sieve
    model = hub.load_model(args.model, dtype=torch.float32, device=args.device or "cpu")
    tok = data.load_tokenizer(args.model)
    profiles, top = {}, {}
    print(f"{'task':<10}{'tokens':>8}{'CV':>7}{'cold %':>8}{'cov@25%':>9}   top-25% experts per layer")
    for name, train_file, _ in task_files(args):
        seqs = sorted(router_profile.calibration(tok, data.read_jsonl(train_file), 256), key=len)
        batches = (data.pad_batch(seqs[i:i + 32], [[1] * len(s) for s in seqs[i:i + 32]], tok.pad_id)
                   for i in range(0, len(seqs), 32))
        p = profiles[name] = router_profile.profile(model, batches)
        top[name] = sieve.topk_plan(p, 0.25)
        m = p["stats"]["mean"]
        print(f"{name:<10}{p['tokens']:>8,}{m['cv']:>7.3f}{100 * m['cold']:>8.1f}{100 * m['cov25']:>9.1f}   "
              + " | ".join(",".join(map(str, e)) for e in top[name].values()))
    names, layers = list(profiles), list(next(iter(top.values())))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    jac = {f"{a}/{b}": [len(set(top[a][l]) & set(top[b][l])) / len(set(top[a][l]) | set(top[b][l])) for l in layers]
           for a, b in pairs}
    print("\nJaccard of the top-25% sets per layer (1 = the same experts; two random sets of 4 of 16: 0.16 expected)")
    print(f"{'pair':<16}" + "".join(f"{'L' + str(l):>7}" for l in layers) + f"{'mean':>7}")
    for pair, js in jac.items():
        print(f"{pair:<16}" + "".join(f"{j:>7.2f}" for j in js) + f"{statistics.mean(js):>7.2f}")
    os.makedirs(args.out, exist_ok=True)
    checkpoint.write_json(os.path.join(args.out, "routing.json"), dict(
        stats={n: p["stats"] for n, p in profiles.items()},
        top25={n: {str(k): v for k, v in t.items()} for n, t in top.items()},
        jaccard=jac, counts={n: p["counts"] for n, p in profiles.items()}))
    png = os.path.join(args.out, "routing_overlap.png")
    if jac and plots.heatmap(png, list(jac.values()), "Jaccard overlap of the tasks' top-25% experts", "MoE layer",
                             "task pair", list(jac), "Jaccard"):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
