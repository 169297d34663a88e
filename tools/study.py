"""study.py: the embedded default job, and a miniature reproduction of the papers' tables.

    python -m tools.study --default                 # the embedded default job: one task, four methods, one seed
    python -m tools.study --compare results/study   # the committed study again (every method x 5 seeds x 3 tasks),
                                                    # each run's numbers checked against results/study/<task>.json
    python -m tools.study --train my.train.jsonl --val my.val.jsonl --methods lora,sieve,random --seeds 5
    python -m tools.study --routing --out results/study   # each task's routing and the overlap of their top-25% experts

For each task, method and seed it fine-tunes the base model with train.py (same flags for all), evaluates
multiple-choice accuracy on the task's validation records with eval.py, and prints the table (trainable
parameters, adapter size, time, accuracy as mean ± std over seeds, the paired difference to full LoRA with a
95% t-interval) and each claim of the seed papers with the measured difference, its interval and a verdict
(claims.py). The runs go to --jobs worker processes of --threads threads each: a run's numbers depend only on
its flags and the thread count, not on the worker or the order, so any --jobs gives the same tables. The time
claims come from a controlled timing: lora, sieve and dmep trained again one at a time, alone, after the runs.
Finished runs (OUT/runs/<task>/<method>/seedN/result.json, same settings) are reused: after Ctrl-C the same
command goes on. Under --out (runs/study): <task>.json (runs, table, claims, timing), study.txt, the plot, runs/.
"""
import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent import futures

import torch

import eval as evaluation
import methods
import train
from files import atomic, data, hub, tokenizer
from tools import claims

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
TASKS = ("max", "count", "words")  # pretrain/tasks.py; see tasks/README.md
DEFAULT_OUT = os.path.join("runs", "study")
METHODS = ("attn", "attn@32", "lora", "sieve", "random", "budget", "coverage", "perft-s", "perft-r", "perft-e", "dmep")
TIMED = ("lora", "sieve", "dmep")  # the methods of the time claims


def parse_args(argv):
    ap = argparse.ArgumentParser(description="Methods x seeds on a base model and multiple-choice tasks.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--default", action="store_true", help="the embedded default job (what `python train.py` runs)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: a few steps and records (CI)")
    ap.add_argument("--plain", "--reference", action="store_true", help="train and evaluate on moe.py's plain code (slow)")
    ap.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout of every run (train.py's --dropout)")
    hub.add_model_flags(ap, model=os.path.join(ROOT, "model"), dtype=False)  # --model, --device
    ap.add_argument("--tasks", "--task", default=",".join(TASKS),
                    help="task names: each reads tasks/<task>.train.jsonl and .val.jsonl")
    ap.add_argument("--tasks-dir", default=os.path.join(ROOT, "tasks"), help="where the task files are")
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
    ap.add_argument("--out", default=None, help=f"output directory (default {DEFAULT_OUT}; with --report: write the "
                    "merged JSONs and study.txt there, nothing without it)")
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
                     ("dropout", 0 <= args.dropout < 1),
                     ("train", (args.train is None) == (args.val is None))):
        if not ok:
            ap.error(f"--{flag} has an invalid value: {getattr(args, flag.replace('-', '_'))}"
                     + (" (--train and --val go together)" if flag == "train" else ""))
    if args.default:  # about a minute on two CPU cores: one task, the four MoE-Sieve methods, one seed
        args.tasks, args.methods, args.seeds, args.steps, args.limit = "max", "attn,lora,sieve,random", 1, 60, 200
        # no LoRA dropout, so that --plain gives the same run: the plain loop draws dropout masks expert by
        # expert, the grouped path for all rows at once, so with dropout the two are different random draws
        args.dropout = 0.0
    if args.quick:
        args.steps, args.limit, args.batch_size, args.timing_steps = 3, 16, 4, min(args.timing_steps, 3)
    try:
        hub.pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.jobs is None:
        args.jobs = 1 if hub.pick_device(args.device).type == "cuda" else max(1, min(8, os.cpu_count() or 1))
    args.write = args.out is not None or not args.report  # --report writes only where told to
    args.out = args.out or DEFAULT_OUT
    return args


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
    if args.plain:
        flags.append("--plain")
    try:
        code = train.main([str(f) for f in flags])
    except SystemExit as e:  # train.py's flag errors exit through argparse: in a worker, that would end the
        code = e.code if isinstance(e.code, int) else 1  # process and leave its job unanswered (a hang)
    if code in (130, 143):  # train.py caught Ctrl-C / SIGTERM, checkpointed and stopped: the study stops too
        raise KeyboardInterrupt
    if code != 0:
        raise RuntimeError(f"train.py --method {spec} --seed {seed} failed (its output: {out}/output.txt)")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(out, "log.jsonl")) as f:  # one process's own step times
        summary["step_s"] = statistics.median(json.loads(line)["step_s"] for line in f)
    return summary


def accuracy(args, tok, records, adapter=None):
    model = hub.load_model(args.model, dtype=torch.float32, device=hub.pick_device(args.device))
    if adapter:
        methods.load_adapter(model, adapter)
    model.set_plain(args.plain)
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


def digest(paths):
    """sha256 of the files' contents, in the order given (the model, the task files, the code)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def source_files():
    """Every .py file of the library and its tools: the root's and each package folder's (files/, training/, ...)."""
    packages = [d for d in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    return sorted(os.path.join(ROOT, d, f) for d in ["", *packages] for f in os.listdir(os.path.join(ROOT, d))
                  if f.endswith(".py"))


def shown(path):
    """A path as a result file records it: relative to the repository when inside it (no machine's own paths)."""
    path = os.path.abspath(path)
    return os.path.relpath(path, ROOT) if path.startswith(ROOT + os.sep) else path


def settings(args, task, train_file, val_file):
    """What a run's numbers depend on: the flags, the thread count and device, the contents of the model and
    task files, this repository's code and torch's version. A saved run is reused only if all are the same."""
    keys = ("steps", "batch_size", "seq_len", "rank", "lr", "limit", "dropout", "plain", "threads")
    model_files = sorted(os.path.join(args.model, f) for f in os.listdir(args.model)
                         if os.path.isfile(os.path.join(args.model, f)) and not f.endswith(".md"))
    return dict(task=task, model=shown(args.model), train=shown(train_file), val=shown(val_file),
                **{k: getattr(args, k) for k in keys}, device=str(hub.pick_device(args.device)),
                model_sha=digest(model_files), task_sha=digest([train_file, val_file]), code_sha=digest(source_files()),
                torch=torch.__version__)


def one_run(job):
    """One (task, method, seed): fine-tune, evaluate, save OUT/runs/<task>/<method>/seedN/result.json. Its
    printing goes to output.txt beside it. Reused if result.json has the same settings. In a worker or not."""
    args, task, train_file, val_file, method, seed, key = job
    out = os.path.join(args.out, "runs", task, method, f"seed{seed}")
    saved = os.path.join(out, "result.json")
    try:
        with open(saved) as f:
            old = json.load(f)
        if old["settings"] == key:
            return task, method, dict(old["run"], reused=True)
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not a result of ours: train it (again)
        pass
    t0 = time.time()
    with quietly(out), torch_threads(args.threads):
        s = fine_tune(args, method, seed, train_file, out)
        res = accuracy(args, tokenizer.load(args.model), data.read_jsonl(val_file)[: args.limit], out)
    dmep_keys = ("trainable_before_prune", "tok_s_before_prune", "tok_s_after_prune")
    run = dict(seed=seed, acc=res["acc"], acc_norm=res["acc_norm"], nll=res["gold_nll"], params=s["trainable_params"],
               adapter_bytes=s["adapter_bytes"], train_s=s["wall_s"], total_s=round(time.time() - t0, 1),
               step_s=s["step_s"], device=s["device"], **{k: s[k] for k in dmep_keys if k in s})
    atomic.write_json(saved, dict(settings=key, run=run))
    return task, method, run


def run_all(args, jobs):
    """Every job, in --jobs spawned workers (or here with --jobs 1); {task: {method: [run per seed]}}."""
    done, t0, ok = {}, time.time(), False
    n = min(args.jobs, len(jobs))  # a worker that dies (say, killed for memory) ends the study: BrokenProcessPool
    pool = futures.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) if n > 1 else None
    results = (f.result() for f in futures.as_completed([pool.submit(one_run, j) for j in jobs])) if pool else \
        map(one_run, jobs)
    try:
        for i, (task, method, run) in enumerate(results, 1):
            done.setdefault(task, {}).setdefault(method, []).append(run)
            how = "reused" if run.pop("reused", False) else f"{run['total_s']:.0f} s"
            print(f"[{i}/{len(jobs)}] {task} {method} seed {run['seed']}: acc {run['acc']:.3f} ({how}, "
                  f"{time.time() - t0:.0f} s so far)", flush=True)
        ok = True
    finally:
        if pool and not ok:  # an error or Ctrl-C: the runs in flight are abandoned (the finished ones are kept)
            for p in multiprocessing.active_children():  # and their workers killed, not waited for
                p.kill()
        if pool:
            pool.shutdown(wait=ok, cancel_futures=True)
    return {t: {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in ms.items()} for t, ms in done.items()}


def device_name(args):
    """The device of the timing, in words: the GPU's name, or the CPU's model and the threads used."""
    if hub.pick_device(args.device).type == "cuda":
        return torch.cuda.get_device_name()
    name = "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name}, {args.threads} thread{'s' if args.threads > 1 else ''}"


def timing(args, task, train_file, specs):
    """The controlled timing of one task: lora, sieve and dmep (those studied) trained again for --timing-steps
    steps at seed 0, one at a time in this process after the workers have ended, so nothing else runs: the
    median step time of each, and DMEP's tokens/s before and after its pruning (bench.py's method on the real
    model, data and plans). None: nothing to time."""
    timed = [m for m in TIMED if m in specs]
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
        specs = args.methods.split(",")  # METHOD or METHOD@RANK
        for m in specs:
            if m.partition("@")[0] not in methods.METHODS or not (m.partition("@")[2] or "1").isdigit():
                raise ValueError(f"--methods: {m!r} is not one of {', '.join(methods.METHODS)} (optionally @RANK)")
        files = task_files(args)
        if len({name for name, _, _ in files}) != len(files):
            raise ValueError(f"--tasks {args.tasks}: a task is named twice")
        if args.routing:
            return routing(args)
        tok, vals = tokenizer.load(args.model), {}
        for name, train_file, val_file in files:  # every file checked before the first run
            for path in (train_file, val_file):
                if not os.path.isfile(path):
                    raise OSError(f"{path}: task file not found (--tasks {name}, or --train / --val)")
            vals[name] = data.read_jsonl(val_file)[: args.limit]
            evaluation.check_task(vals[name], "mc", val_file)
            data.check_records(data.read_jsonl(train_file), train_file)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise OSError(f"--out {args.out}: exists and is not a directory")
        saved = load_compare(args, [name for name, _, _ in files]) if args.compare else None
        base = {}
        for name, _, _ in files:
            with torch_threads(args.threads):
                b = base[name] = accuracy(args, tok, vals[name])
            print(f"study: base model {shown(args.model)}: acc {b['acc']:.3f} acc_norm {b['acc_norm']:.3f} gold nll/char "
                  f"{b['gold_nll']:.3f} on {len(vals[name])} records of {name}")
        keys = {name: settings(args, name, tr, va) for name, tr, va in files}
        jobs = [(args, name, tr, va, m, s, keys[name]) for name, tr, va in files for m in specs
                for s in range(args.seeds)]
        print(f"study: {len(jobs)} runs ({len(files)} task(s) x {len(specs)} methods x {args.seeds} seeds, "
              f"{args.steps} steps each) in {min(args.jobs, len(jobs))} process(es) of {args.threads} thread(s); "
              f"each run's output in {os.path.join(args.out, 'runs', 'TASK', 'METHOD', 'seedN')}", flush=True)
        t0 = time.time()
        done = run_all(args, jobs)
        wall = round(time.time() - t0)  # of all the runs, every task
        results = [dict(task=name, model=args.model, steps=args.steps, seeds=args.seeds, rank=args.rank,
                        n_val=len(vals[name]), lr=args.lr, batch_size=args.batch_size, base=base[name],
                        settings=keys[name], runs={m: done[name][m] for m in specs}, wall_s_all_runs=wall,
                        jobs=args.jobs, timing=timing(args, name, tr, specs), table=None, claims=None)
                   for name, tr, va in files]
        print(f"\nstudy: {len(jobs)} runs in {wall / 60:.1f} minutes of wall time ({args.jobs} process(es))")
        claims.summarize(results, args.out)
        return claims.compare(results, saved) if saved else 0
    except (ValueError, OSError, RuntimeError) as e:
        print(f"study: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"study: interrupted; the finished runs are kept in {os.path.join(args.out, 'runs')}: the same command "
              "goes on from them", file=sys.stderr)
        return 130


def load_compare(args, names):
    """--compare DIR, read before the first run: DIR/<task>.json of every task. DIR must not be --out (the
    study would write its own results there first, and then compare them with themselves)."""
    if os.path.realpath(args.compare) == os.path.realpath(args.out):
        raise ValueError(f"--compare {args.compare} is --out: write the new study elsewhere (the default --out, "
                         f"{DEFAULT_OUT}, or another)")
    saved = {}
    for name in names:
        path = os.path.join(args.compare, f"{name}.json")
        if not os.path.isfile(path):
            raise OSError(f"--compare {args.compare}: it has no {name}.json to compare task {name} with")
        saved[name] = (path, claims.read_study(path))
    return saved


def reprint(args):
    """--report: the tables and claims of saved studies; files of the same task (say, one per group of methods,
    run apart) are merged, their runs joined (a method in two files of one task is refused). With --plot, the
    picture; with --out, the merged JSONs, study.txt and the picture there."""
    merged = {}
    try:
        for path in args.report:
            res = claims.read_study(path)
            if res["task"] not in merged:
                merged[res["task"]] = dict(res, sources=[path])
                continue
            have = merged[res["task"]]
            if twice := set(have["runs"]) & set(res["runs"]):
                raise ValueError(f"{path}: method(s) {', '.join(sorted(twice))} of task {res['task']} also in "
                                 f"{', '.join(have['sources'])}: which to keep?")
            have["runs"].update(res["runs"])
            have["sources"].append(path)
    except ValueError as e:
        print(f"study: error: --report {e}", file=sys.stderr)
        return 1
    claims.summarize([{k: v for k, v in r.items() if k != "sources"} for r in merged.values()],
                     args.out if args.write else None, args.plot)
    return 0


def routing(args):
    """--routing: each task's routing profile on its training records, and the overlap of the tasks' top-25%
    expert sets (router_profile.compare_tasks); the printing also goes to OUT/routing.txt."""
    import router_profile
    model = hub.load_model(args.model, dtype=torch.float32, device=args.device or "cpu")
    tasks = {name: data.read_jsonl(train_file) for name, train_file, _ in task_files(args)}
    with contextlib.redirect_stdout(buf := io.StringIO()):
        written = router_profile.compare_tasks(model, tokenizer.load(args.model), tasks, args.out)
    print(text := buf.getvalue(), end="")
    atomic.write_text(path := os.path.join(args.out, "routing.txt"), text)
    print("\nwrote:\n" + "".join(f"  {w}\n" for w in [*written, f"{path} (the tables above)"]), end="")
    return 0


if __name__ == "__main__":  # run as tools.study, so that the worker processes find one_run under that name
    from tools import study
    sys.exit(study.main())
