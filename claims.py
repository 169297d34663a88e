"""claims.py: what a study's numbers say about the papers' claims: paired intervals, verdicts, tables, the plot.

study.py runs the methods; this file only reads their results (plain dicts, as saved in OUT/<task>.json):

    runs   = {method: [{seed, acc, acc_norm, nll, params, adapter_bytes, train_s, ...}, one per seed]}
    timing = {device, steps, step_s: {method: median seconds per step}, dmep_tok_s: [before, after] or None}

Accuracy claims compare two methods seed by seed (seed s of every method sees the same data order, so the
per-seed difference cancels most of the order's noise) with a 95% t-interval, and a verdict by the rule
printed beside each claim (CLAIMS). Time claims come only from the controlled timing: the runs measured one
at a time, alone on the machine, after the study (study.timing), never from runs that shared the CPU.
"""
import math
import os
import statistics

import lora

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}  # t(0.975, df)
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan", "black")


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
    return rows, claims(runs, [res["timing"]] if res.get("timing") else [])


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


def claims(runs, timings=()):
    """The seed papers' claims next to what was measured (where both sides were run); returns their rows.
    timings: the controlled timings of the tasks concerned (one per task; pooled: their mean)."""
    par = {m: rs[0]["params"] for m, rs in runs.items()}
    out = []
    print("\nclaims (paper -> measured here, a - b paired over seeds, 95% t-interval -> verdict):")
    for a, b, claim, rule, repro, contra in CLAIMS:
        if a in runs and b in runs:
            text, v = verdict(runs, a, b, (repro, contra))
            print(f"  {claim} -> {a} - {b}: {text} with {par[a]:,} vs {par[b]:,} parameters -> {v}  ({rule})")
            out.append(dict(claim=claim, a=a, b=b, measured=text, verdict=v, rule=rule))
    if "sieve" in runs and "lora" in runs:
        print(f"  MoE-Sieve: ~70-73% fewer trainable parameters -> {100 * (1 - par['sieve'] / par['lora']):.1f}% fewer")
    if "dmep" in runs:
        cut = statistics.mean(1 - r["params"] / r["trainable_before_prune"] for r in runs["dmep"])
        print(f"  DMEP: 35-43% fewer trainable parameters after pruning -> {100 * cut:.1f}% fewer")
    time_claims(runs, timings)
    return out


def time_claims(runs, timings):
    """MoE-Sieve's training time and DMEP's throughput, from the controlled timing only."""
    where = f"one process alone on {timings[0]['device']}" if timings else ""
    if "sieve" in runs and "lora" in runs:
        ts = [t["step_s"] for t in timings if "sieve" in t["step_s"] and "lora" in t["step_s"]]
        if not ts:
            print("  MoE-Sieve: up to 50% less training time -> not timed (no controlled timing in these results)")
        else:
            less = statistics.mean(1 - t["sieve"] / t["lora"] for t in ts)
            each = ", ".join(f"{t['sieve']:.3f}s vs {t['lora']:.3f}s" for t in ts)
            print(f"  MoE-Sieve: up to 50% less training time -> {100 * less:.1f}% less per step (controlled: median "
                  f"step of sieve vs lora {each}, {where})")
    if "dmep" in runs:
        ds = [t["dmep_tok_s"] for t in timings if t.get("dmep_tok_s")]
        if not ds:
            print("  DMEP: ~10% more throughput after pruning -> not timed (no controlled timing in these results)")
        else:
            more = statistics.mean(after / before - 1 for before, after in ds)
            each = ", ".join(f"{b:,.0f} -> {a:,.0f}" for b, a in ds)
            print(f"  DMEP: ~10% more throughput after pruning -> {100 * more:+.1f}% (controlled: tok/s before -> after "
                  f"pruning {each}, {where})")


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
                        color=COLOURS[j % len(COLOURS)], label=m)
        ax.axhline(100 * res["base"]["acc"], color="grey", linestyle="--", linewidth=1, label="base")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(f"{res['task']} ({res['seeds']} seeds, {res['steps']} steps)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    lora.atomic_write(os.fspath(path), lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return True
