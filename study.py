"""study.py: the embedded default job, and a miniature reproduction of the papers' tables.

    python train.py                     # = python study.py --default: one task, four methods, one seed (~1 min)
    python study.py --compare results/study   # the committed study again (every method x 5 seeds x 3 tasks),
                                              # each run's numbers checked against results/study/<task>.json
    python study.py --train my.train.jsonl --val my.val.jsonl --methods lora,sieve,random --seeds 5
    python study.py --routing --out results/study   # each task's routing and the overlap of their top-25% experts

For each task, method and seed it fine-tunes the base model with train.py (same flags for all), evaluates
multiple-choice accuracy on the task's validation records with eval.py, and prints the table (trainable
parameters, adapter size, time, accuracy as mean ± std over seeds, the paired difference to full LoRA with a
95% t-interval) and each claim of the seed papers with the measured difference, its interval and a verdict
(claims.py). The runs go to --jobs worker processes of --threads threads each: a run's numbers depend only on
its flags and the thread count, not on the worker or the order, so any --jobs gives the same tables. The time
claims come from a controlled timing: lora, sieve and dmep trained again one at a time, alone, after the runs.
Runs already done (OUT/runs/<task>/<method>/seedN/result.json with the same settings) are reused: after
Ctrl-C, the same command goes on. Everything goes under --out (runs/study by default): <task>.json (every run's
numbers, the table, the claims, the timing), study.txt (what was printed), accuracy_params.png, runs/.
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import time

import torch

import checkpoint
import claims
import data
import eval as evaluation
import hub
import lora
import train

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("max", "count", "words")  # pretrain/tasks.py; see tasks/README.md
DEFAULT_OUT = os.path.join("runs", "study")
METHODS = ("attn", "attn@32", "lora", "sieve", "random", "budget", "coverage", "perft-s", "perft-r", "perft-e", "dmep")
TIMED = ("lora", "sieve", "dmep")  # the methods of the time claims


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
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence (the tasks' items are short)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = 2 * rank)")
    ap.add_argument("--lr", type=float, default=5e-3, help="peak learning rate")
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N validation records")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output directory (with --report: write the merged JSONs there)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--jobs", type=int, default=None, help="runs in parallel, one process each (default: the CPU "
                    "cores, at most 8; 1 on CUDA); 1 = in this process")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each run (the numbers depend on it)")
    ap.add_argument("--timing-steps", type=int, default=60, help="steps of each controlled timing run (0: none)")
    ap.add_argument("--compare", default=None, help="a directory of a study's <task>.json: check every run's numbers "
                    "against it (exit 1 if any differs)")
    ap.add_argument("--routing", action="store_true", help="only profile each task's routing and compare the tasks' "
                    "top-25%% expert sets (table, OUT/routing.json, OUT/routing_overlap.png)")
    ap.add_argument("--report", nargs="+", default=None, help="print the tables and claims again from study JSONs "
                    "(no runs); with --plot also draw accuracy against trainable parameters")
    ap.add_argument("--plot", default=None, help="with --report: write the accuracy / parameters picture here")
    args = ap.parse_args(argv)
    for flag, ok in (("seeds", args.seeds >= 1), ("steps", args.steps >= 1), ("batch-size", args.batch_size >= 1),
                     ("rank", args.rank >= 1), ("lr", args.lr > 0), ("limit", args.limit is None or args.limit >= 1),
                     ("seq-len", args.seq_len >= 2), ("jobs", args.jobs is None or args.jobs >= 1),
                     ("threads", args.threads >= 1), ("timing-steps", args.timing_steps >= 0),
                     ("train", (args.train is None) == (args.val is None))):
        if not ok:
            ap.error(f"--{flag} has an invalid value: {getattr(args, flag.replace('-', '_'))}"
                     + (" (--train and --val go together)" if flag == "train" else ""))
    if args.default:  # about a minute on two CPU cores: one task, the four MoE-Sieve methods, one seed
        args.tasks, args.methods, args.seeds, args.steps, args.limit = "max", "attn,lora,sieve,random", 1, 60, 200
        # no LoRA dropout, so that --reference gives the same run: the plain loop draws dropout masks expert by
        # expert, the grouped path for all rows at once, so with dropout the two are different random draws
        args.dropout = 0.0
    if args.quick:
        args.steps, args.limit, args.batch_size, args.timing_steps = 3, 16, 4, min(args.timing_steps, 3)
    if args.jobs is None:
        args.jobs = 1 if device_of(args).startswith("cuda") else max(1, min(8, os.cpu_count() or 1))
    return args


def device_of(args):
    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def task_files(args):
    """[(name, train file, val file)]: --train/--val (named after the validation file), else each of --tasks."""
    if args.train:
        return [(os.path.basename(args.val).split(".")[0], args.train, args.val)]
    return [(t, os.path.join(args.tasks_dir, f"{t}.train.jsonl"), os.path.join(args.tasks_dir, f"{t}.val.jsonl"))
            for t in args.tasks.split(",")]


def fine_tune(args, spec, seed, train_file, out, steps=None):
    """One train.py run of a method spec (METHOD or METHOD@RANK); its summary plus the median step time."""
    method, _, rank = spec.partition("@")
    steps = steps or args.steps
    flags = ["--model", args.model, "--data", train_file, "--method", method, "--rank", rank or args.rank,
             "--steps", steps, "--batch-size", args.batch_size, "--lr", args.lr, "--seed", seed, "--out", out,
             "--seq-len", args.seq_len, "--log-every", max(1, steps // 4), "--calib-samples", 256, "--warmup", 0.1,
             "--dropout", args.dropout]
    if args.device:
        flags += ["--device", args.device]
    if args.reference:
        flags.append("--reference")
    if train.main([str(f) for f in flags]) != 0:
        raise RuntimeError(f"train.py --method {spec} --seed {seed} failed (its output: {out}/output.txt)")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:  # one process's own step times
        summary["step_s"] = statistics.median(json.loads(line)["step_s"] for line in f)
    return summary


def accuracy(args, tok, records, adapter=None):
    model = hub.load_model(args.model, dtype=torch.float32, device=device_of(args))
    if adapter:
        lora.load_adapter(model, adapter)
    model.set_reference(args.reference)
    return evaluation.multiple_choice(model, tok, records, batch_size=32, seq_len=512)


@contextlib.contextmanager
def torch_threads(n):
    """torch's intra-op threads set to n inside (a run's float sums, so its numbers, depend on them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def quietly(out):
    """Everything printed inside goes to out/output.txt (runs in parallel would interleave their lines)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "output.txt"), "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        yield


def settings(args, task, train_file, val_file):
    """What a run's numbers depend on: a saved run is reused only if all of it is the same."""
    keys = ("steps", "batch_size", "seq_len", "rank", "lr", "limit", "dropout", "reference", "threads", "device")
    return dict(task=task, model=os.path.abspath(args.model), train=os.path.abspath(train_file),
                val=os.path.abspath(val_file), **{k: getattr(args, k) for k in keys})


def one_run(job):
    """One (task, method, seed): fine-tune, evaluate, save OUT/runs/<task>/<method>/seedN/result.json. Its
    printing goes to output.txt beside it. Reused if result.json has the same settings. In a worker or not."""
    args, task, train_file, val_file, method, seed = job
    out = os.path.join(args.out, "runs", task, method, f"seed{seed}")
    key = settings(args, task, train_file, val_file)
    saved = os.path.join(out, "result.json")
    if os.path.isfile(saved):
        with open(saved) as f:
            old = json.load(f)
        if old.get("settings") == key:
            return task, method, dict(old["run"], reused=True)
    t0 = time.time()
    with quietly(out), torch_threads(args.threads):
        s = fine_tune(args, method, seed, train_file, out)
        res = accuracy(args, data.load_tokenizer(args.model), data.read_jsonl(val_file)[: args.limit], out)
    dmep_keys = ("trainable_before_prune", "tok_s_before_prune", "tok_s_after_prune")
    run = dict(seed=seed, acc=res["acc"], acc_norm=res["acc_norm"], nll=res["gold_nll"], params=s["trainable_params"],
               adapter_bytes=s["adapter_bytes"], train_s=s["wall_s"], total_s=round(time.time() - t0, 1),
               step_s=s["step_s"], device=s["device"], **{k: s[k] for k in dmep_keys if k in s})
    checkpoint.write_json(saved, dict(settings=key, run=run))
    return task, method, run


def run_all(args, jobs):
    """Every job, in --jobs spawned workers (or here with --jobs 1); {task: {method: [run per seed]}}."""
    done, t0 = {}, time.time()
    pool = multiprocessing.get_context("spawn").Pool(args.jobs) if args.jobs > 1 and len(jobs) > 1 else None
    results = pool.imap_unordered(one_run, jobs) if pool else map(one_run, jobs)
    try:
        for i, (task, method, run) in enumerate(results, 1):
            done.setdefault(task, {}).setdefault(method, []).append(run)
            how = "reused" if run.pop("reused", False) else f"{run['total_s']:.0f} s"
            print(f"[{i}/{len(jobs)}] {task} {method} seed {run['seed']}: acc {run['acc']:.3f} ({how}, "
                  f"{time.time() - t0:.0f} s so far)", flush=True)
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return {t: {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in ms.items()} for t, ms in done.items()}


def device_name(args):
    """The device of the timing, in words: the GPU's name, or the CPU's model and the threads used."""
    if device_of(args).startswith("cuda"):
        return torch.cuda.get_device_name()
    name = "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {args.threads} thread{'s' if args.threads > 1 else ''}"


def timing(args, task, train_file, methods):
    """The controlled timing of one task: lora, sieve and dmep (those studied) trained again for --timing-steps
    steps at seed 0, one at a time in this process after the workers have ended, so nothing else runs: the
    median step time of each, and DMEP's tokens/s before and after its pruning (bench.py's method on the real
    model, data and plans). None: nothing to time."""
    timed = [m for m in TIMED if m in methods]
    if not timed or not args.timing_steps:
        return None
    res = dict(device=device_name(args), steps=args.timing_steps, step_s={}, dmep_tok_s=None)
    for m in timed:
        out = os.path.join(args.out, "runs", "timing", task, m)
        with quietly(out), torch_threads(args.threads):
            s = fine_tune(args, m, 0, train_file, out, steps=args.timing_steps)
        res["step_s"][m] = round(s["step_s"], 5)
        if m == "dmep" and s.get("tok_s_before_prune") and s.get("tok_s_after_prune"):
            res["dmep_tok_s"] = [s["tok_s_before_prune"], s["tok_s_after_prune"]]
    print(f"timing ({task}, {res['device']}, {args.timing_steps} steps each): " + ", ".join(
        f"{m} {t:.4f} s/step" for m, t in res["step_s"].items()), flush=True)
    return res


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return reprint(args)
    try:
        methods = args.methods.split(",")
        for m in methods:
            if m.partition("@")[0] not in lora.METHODS or not (m.partition("@")[2] or "1").isdigit():
                raise ValueError(f"--methods: {m!r} is not one of {', '.join(lora.METHODS)} (optionally @RANK)")
        files = task_files(args)
        if len({name for name, _, _ in files}) != len(files):
            raise ValueError(f"--tasks {args.tasks}: a task is named twice")
        if args.routing:
            return routing(args)
        tok, vals = data.load_tokenizer(args.model), {}
        for name, train_file, val_file in files:  # every file checked before the first run
            for path in (train_file, val_file):
                if not os.path.isfile(path):
                    raise OSError(f"{path}: task file not found (--tasks {name}, or --train / --val)")
            vals[name] = data.read_jsonl(val_file)[: args.limit]
            evaluation.check_task(vals[name], "mc", val_file)
            data.check_records(data.read_jsonl(train_file), train_file)
            if args.compare and not os.path.isfile(os.path.join(args.compare, f"{name}.json")):
                raise OSError(f"--compare {args.compare}: it has no {name}.json to compare task {name} with")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise OSError(f"--out {args.out}: exists and is not a directory")
        base = {}
        for name, _, _ in files:
            with torch_threads(args.threads):
                b = base[name] = accuracy(args, tok, vals[name])
            print(f"study: base model {args.model}: acc {b['acc']:.3f} acc_norm {b['acc_norm']:.3f} gold nll/char "
                  f"{b['gold_nll']:.3f} on {len(vals[name])} records of {name}")
        jobs = [(args, name, tr, va, m, s) for name, tr, va in files for m in methods for s in range(args.seeds)]
        print(f"study: {len(jobs)} runs ({len(files)} task(s) x {len(methods)} methods x {args.seeds} seeds, "
              f"{args.steps} steps each) in {min(args.jobs, len(jobs))} process(es) of {args.threads} thread(s); "
              f"each run's output in {os.path.join(args.out, 'runs', 'TASK', 'METHOD', 'seedN')}", flush=True)
        done = run_all(args, jobs)
        results = [dict(task=name, model=args.model, steps=args.steps, seeds=args.seeds, rank=args.rank,
                        n_val=len(vals[name]), lr=args.lr, batch_size=args.batch_size, base=base[name],
                        settings=settings(args, name, tr, va), runs={m: done[name][m] for m in methods},
                        timing=timing(args, name, tr, methods), table=None, claims=None) for name, tr, va in files]
        summarize(args, results, write=True)
        return compare(args, results) if args.compare else 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"study: interrupted; the finished runs are kept in {os.path.join(args.out, 'runs')}: the same command "
              "goes on from them", file=sys.stderr)
        return 130


def summarize(args, results, write, plot_path=None):
    """Print each task's table and claims and, over several tasks, the claims pooled over every (task, seed);
    with write, OUT/<task>.json, OUT/study.txt (this printing) and the plot (OUT/accuracy_params.png)."""
    with contextlib.redirect_stdout(buf := io.StringIO()):  # printed once done, and kept for study.txt
        for res in results:
            res["table"], res["claims"] = claims.report(res)
        if len(results) > 1:  # the claims over every (task, seed) pair: one average over the tasks, a tighter interval
            common = [m for m in results[0]["runs"] if all(m in r["runs"] for r in results)]
            pooled = {m: [r for res in results for r in res["runs"][m]] for m in common}
            print(f"\nall {len(results)} tasks pooled ({', '.join(r['task'] for r in results)}): each (task, seed) is one pair")
            claims.claims(pooled, [r["timing"] for r in results if r.get("timing")])
    print(text := buf.getvalue(), end="")
    written = []
    if write:
        os.makedirs(args.out, exist_ok=True)
        for res in results:
            checkpoint.write_json(path := os.path.join(args.out, f"{res['task']}.json"), res)
            written.append(f"{path} (the table, the claims, the timing and every run's numbers)")
        lora.atomic_write(path := os.path.join(args.out, "study.txt"), lambda t: open(t, "w").write(text))
        written.append(f"{path} (the tables and claims above)")
        plot_path = plot_path or os.path.join(args.out, "accuracy_params.png")
    if plot_path and claims.plot(results, plot_path):
        written.append(f"{plot_path} (accuracy against trainable parameters, 95% interval bars)")
    print("\nwrote:\n" + "".join(f"  {w}\n" for w in written) if written else "", end="")
    if write:
        print(f"print them again: python study.py --report {os.path.join(args.out, '*.json')}")


def compare(args, results):
    """--compare DIR: every run's accuracy, gold nll/char and parameter count against DIR/<task>.json's (exit 1
    if any differs or is missing; the settings that differ are named, since they explain it)."""
    bad = 0
    for res in results:
        path = os.path.join(args.compare, f"{res['task']}.json")
        try:
            with open(path) as f:
                old = json.load(f)
            old_runs = old["runs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"compare: {path}: not a study result ({type(e).__name__}: {e})")
            bad += 1
            continue
        changed = [k for k, v in old.get("settings", {}).items() if res["settings"].get(k) != v and k not in
                   ("model", "train", "val")]
        diffs, n = [], 0
        for m, rs in res["runs"].items():
            for r in rs:
                n += 1
                o = next((x for x in old_runs.get(m, []) if x["seed"] == r["seed"]), None)
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


def reprint(args):
    """--report: the tables and claims of saved studies; files of the same task (say, one per group of methods,
    run apart) are merged, their runs joined. With --plot, the picture; with --out, the merged JSONs and study.txt."""
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
        else:
            merged[task] = res
    summarize(args, list(merged.values()), write=args.out != DEFAULT_OUT, plot_path=args.plot)
    return 0


def routing(args):
    """--routing: each task's routing profile on its training records, and the overlap of the tasks' top-25%
    expert sets (router_profile.compare_tasks); the printing also goes to OUT/routing.txt."""
    import router_profile
    model = hub.load_model(args.model, dtype=torch.float32, device=args.device or "cpu")
    tasks = {name: data.read_jsonl(train_file) for name, train_file, _ in task_files(args)}
    with contextlib.redirect_stdout(buf := io.StringIO()):
        written = router_profile.compare_tasks(model, data.load_tokenizer(args.model), tasks, args.out)
    print(text := buf.getvalue(), end="")
    lora.atomic_write(path := os.path.join(args.out, "routing.txt"), lambda t: open(t, "w").write(text))
    print("\nwrote:\n" + "".join(f"  {w}\n" for w in [*written, f"{path} (the tables above)"]), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
