"""claims.py: what a study's numbers say about the papers' claims: paired intervals, verdicts, tables, the plot.

study.py runs the methods; this file only reads their results (plain dicts, as saved in OUT/<task>.json),
prints and saves the tables (summarize), and checks a new study's numbers against a saved one (compare):

    runs   = {method: [{seed, acc, acc_norm, nll, params, adapter_bytes, train_s, ...}, one per seed]}
    timing = {device, steps, step_s: {method: median seconds per step}, dmep_tok_s: [before, after] or None}

Accuracy claims compare two methods seed by seed, matched on (task, seed) (seed s of every method sees the
same data order, so the per-seed difference cancels most of the order's noise), with a 95% t-interval and a
verdict by the rule printed beside each claim (CLAIMS). Time claims come only from the controlled timing: the runs measured one
at a time, alone on the machine, after the study (study.timing), never from runs that shared the CPU.
"""
import contextlib
import io
import json
import math
import os
import statistics

from files import atomic

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
    """Mean of the paired differences xs - ys (xs[i] and ys[i] of the same seed) and its 95% t-interval half-width."""
    d = [x - y for x, y in zip(xs, ys)]
    if len(d) < 2:
        return statistics.mean(d), float("nan")
    return statistics.mean(d), t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))


def pairs(a_runs, b_runs, key):
    """The values `key` of two methods' runs, matched by (task, seed): ([a], [b]) in the same order. Runs of one
    method that the other lacks are left out; a (task, seed) twice is an error (two results of one run)."""
    def index(runs):
        out = {}
        for r in runs:
            if (r.get("task"), r["seed"]) in out:
                raise ValueError(f"task {r.get('task')} seed {r['seed']}: two results of the same run")
            out[(r.get("task"), r["seed"])] = r[key]
        return out
    a, b = index(a_runs), index(b_runs)
    common = sorted((k for k in a if k in b), key=str)
    return [a[k] for k in common], [b[k] for k in common]


def params(rs):
    """A method's trainable parameters: the mean over its runs (DMEP's differ by seed: it prunes by use)."""
    return round(statistics.mean(r["params"] for r in rs))


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
        row = dict(method=m, params=params(rs), adapter_mb=round(statistics.mean(r["adapter_bytes"] for r in rs) / 2**20, 3),
                   train_s=round(statistics.mean(r["train_s"] for r in rs), 1), acc=round(acc, 4), acc_std=round(sd, 4),
                   acc_norm=round(statistics.mean(r["acc_norm"] for r in rs), 4),
                   nll=round(statistics.mean(r["nll"] for r in rs), 4))
        rel = f"{row['params'] / params(ref):.1%}" if ref else "-"
        diff = ndiff = "-"
        if ref and m != "lora":
            d, hw = paired_interval(*pairs(rs, ref, "acc"))
            row["diff_vs_lora"], row["diff_ci95"] = round(d, 4), round(hw, 4)
            diff = f"{100 * d:+.1f} pp{ci(100 * hw, 1)}"
            d, hw = paired_interval(*pairs(rs, ref, "nll"))
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
     "above 0; reproduces: interval below +1 pp", lambda lo, hi: hi < 1, lambda lo, hi: lo > 0),
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
    """(text, verdict) of a - b paired over (task, seed): 'needs >= 3 seeds' below three pairs."""
    n = len(pairs(runs[a], runs[b], "acc")[0])
    if n < 3:  # one or two seeds: no interval worth a verdict
        return f"needs >= 3 seeds (have {n})", "no verdict"
    da, ha = paired_interval(*pairs(runs[a], runs[b], "acc"))
    dn, hn = paired_interval(*pairs(runs[a], runs[b], "nll"))
    lo, hi = 100 * (da - ha), 100 * (da + ha)
    v = "contradicts" if rule[1](lo, hi) else "reproduces" if rule[0](lo, hi) else "inconclusive"
    return f"{100 * da:+.1f} pp{ci(100 * ha, 1)} (gold nll/char {dn:+.4f}{ci(hn, 4)})", v


def claims(runs, timings=()):
    """The seed papers' claims next to what was measured (where both sides were run); returns their rows.
    timings: the controlled timings of the tasks concerned (one per task; pooled: their mean)."""
    par = {m: params(rs) for m, rs in runs.items()}
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


def summarize(results, out=None, plot_path=None):
    """Print each task's table and claims and, over several tasks, the claims pooled over every (task, seed);
    with out, out/<task>.json, out/study.txt (this printing) and the plot (out/accuracy_params.png or plot_path)."""
    with contextlib.redirect_stdout(buf := io.StringIO()):  # printed once done, and kept for study.txt
        for res in results:
            res["table"], res["claims"] = report(res)
        if len(results) > 1:  # the claims over every (task, seed) pair: more pairs, one average over the tasks
            common = [m for m in results[0]["runs"] if all(m in r["runs"] for r in results)]
            pooled = {m: [dict(r, task=res["task"]) for res in results for r in res["runs"][m]] for m in common}
            print(f"\nall {len(results)} tasks pooled ({', '.join(r['task'] for r in results)}): each (task, seed) is one pair")
            claims(pooled, [r["timing"] for r in results if r.get("timing")])
    print(text := buf.getvalue(), end="")
    written = []
    if out:
        os.makedirs(out, exist_ok=True)
        for res in results:
            atomic.write_json(path := os.path.join(out, f"{res['task']}.json"), res)
            written.append(f"{path} (the table, the claims, the timing and every run's numbers)")
        atomic.write_text(path := os.path.join(out, "study.txt"), text)
        written.append(f"{path} (the tables and claims above)")
        plot_path = plot_path or os.path.join(out, "accuracy_params.png")
    if plot_path and plot(results, plot_path):
        written.append(f"{plot_path} (accuracy against trainable parameters, 95% interval bars)")
    print("\nwrote:\n" + "".join(f"  {w}\n" for w in written) if written else "", end="")
    if out:
        print(f"print them again: python -m tools.study --report {os.path.join(out, '*.json')}")


def read_study(path):
    """A saved study's result (OUT/<task>.json), checked to be one: ValueError naming the file if not."""
    try:
        with open(path) as f:
            res = json.load(f)
        ok = isinstance(res["task"], str) and isinstance(res["runs"], dict) and "acc" in res["base"]
        ok = ok and all("seed" in r and "acc" in r and "nll" in r and "params" in r for rs in res["runs"].values() for r in rs)
    except (OSError, ValueError, KeyError, TypeError) as e:  # missing, not JSON, not a study's result
        raise ValueError(f"{path}: not a study result ({type(e).__name__}: {e})") from None
    if not ok or "seeds" not in res or "steps" not in res:
        raise ValueError(f"{path}: not a study result (a task, runs with seed / acc / nll / params, base, seeds, steps)")
    return res


def compare(results, saved):
    """Every run's accuracy, gold nll/char and parameter count against the saved study's (exit 1 if any differs
    or is missing; the settings that differ are named, since they explain it)."""
    bad = 0
    for res in results:
        path, old = saved[res["task"]]
        changed = [k for k, v in old.get("settings", {}).items() if res["settings"].get(k) != v and k not in
                   ("model", "train", "val")]
        diffs, n = [], 0
        for m, rs in res["runs"].items():
            for r in rs:
                n += 1
                o = next((x for x in old["runs"].get(m, []) if x["seed"] == r["seed"]), None)
                if o is None:
                    diffs.append(f"{m} seed {r['seed']}: not in {path}")
                elif any(o[k] != r[k] for k in ("acc", "nll", "params")):
                    diffs.append(f"{m} seed {r['seed']}: acc {r['acc']:.4f} (was {o['acc']:.4f}), nll/char "
                                 f"{r['nll']:.5f} (was {o['nll']:.5f}), params {r['params']:,} (was {o['params']:,})")
        print(f"compare: {res['task']}: {n - len(diffs)} of {n} runs give exactly the numbers of {path}"
              + (f"; settings that differ: {', '.join(changed)}" if changed else ""))
        for d in diffs:
            print(f"  {d}")
        bad += len(diffs)
    return 1 if bad else 0


def plot(results, path):
    """Accuracy against trainable parameters, one panel per task, mean over seeds with 95% t-interval bars."""
    from files import plots
    Figure = plots.figure_class(path)  # 11 methods: matplotlib's default cycle has only 10 colours
    if Figure is None:
        return False
    fig = Figure(figsize=(4.2 * len(results), 3.8))
    for i, res in enumerate(results):
        ax = fig.add_subplot(1, len(results), i + 1)
        for j, (m, rs) in enumerate(res["runs"].items()):  # a colour and a marker of its own for each method
            accs = [100 * r["acc"] for r in rs]
            hw = t975(len(accs) - 1) * statistics.stdev(accs) / math.sqrt(len(accs)) if len(accs) > 1 else 0
            ax.errorbar([params(rs)], [statistics.mean(accs)], yerr=[hw], fmt="osD^v<>ph*X"[j % 11], capsize=3,
                        color=COLOURS[j % len(COLOURS)], label=m)
        ax.axhline(100 * res["base"]["acc"], color="grey", linestyle="--", linewidth=1, label="base")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("validation accuracy %")
        ax.set_title(f"{res['task']} ({res['seeds']} seeds, {res['steps']} steps)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    plots.save(fig, path)
    return True
