"""gpu_check.py: the whole GPU measurement in one command, each result written under --out as soon as it exists.

    python -m tools.gpu_check --out $OUT                            # a fresh H100/H200: at most ~8 minutes
    python -m tools.gpu_check --tiny --device cpu --out /tmp/gc    # the rehearsal of every step (tests/test_gpu_check.py)

Steps, the most important first, so that a run cut short still returns the numbers that matter most:
`tests` (tests/test_gpu.py under pytest, in a subprocess with its own time limit), then bench.py's rows in the
groups of PLAN: the OLMoE-1B-7B shape at 4 x 2048, r 16, eager (attn, lora, sieve, peft-attn, peft-lora); our
rows compiled (peft is never compiled, so this group and the other-methods group are compared with the eager
peft rows); 8 x 2048 lora and peft-lora (the 80 GB fit); the routing profile (router_profile.profile over 64
records of 2048 tokens in batches of 8: tok/s and peak, issue 29); perft-e, perft-r, dmep, dmep-pruned; the
4 x 2048 rows with gradient checkpointing; and, on a GPU with at least 120 GiB (an H200), Mixtral-8x7B (32
layers, random bf16 weights) at 1 x 2048 with gradient checkpointing. `--steps` picks some of them (a second,
shorter call can finish what a first one cut off).

Predicted beside measured: a process beside the rows (`--predict`, on the CPU, fake tensors: tools/memory.py)
writes each row's predicted peak to predicted.jsonl; the summary puts it next to the measured
torch.cuda.max_memory_allocated(), so the first GPU run calibrates the memory model.

Time: every row has its own limit, and the whole run --budget seconds; a row that cannot start in time is
recorded as skipped. The rows run in one worker process (one import, one batch per group). In the worker a
SIGALRM ends a row over its limit (recorded as a timeout) and the next row runs; an OOM or an error is recorded
the same way (bench.run_row). This supervising process kills a worker that gives no result within a row's
limit plus a grace (a hang inside one CUDA call), or sees it die, records that row, and starts a fresh worker
for the rest; a worker whose CUDA context an error has broken exits, and a fresh one carries on.

Files under --out: env.json (device, versions), gpu_tests.txt and .xml, rows.jsonl (one line per row, written
when the row ends), predicted.jsonl (each row's predicted peak), worker.log (bench's output, tracebacks),
summary.txt and summary.json (per group: the table, predicted and measured peaks, and issue 6's targets with
their verdicts, targets.py; rewritten after every row).

--tiny: the same plan on tiny shapes (bench.py --tiny, a 2-layer Mixtral), one warm-up and one timed step per
row, the compiled rows traced by dynamo's eager backend (inductor would compile for minutes on a CPU).
"""
import argparse
import gc
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import torch

from tools import bench
from files import hub
from tools import memory
import moe
import router_profile
from tools import targets
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
OLMOE_4 = "olmoe-4x2048"
MIXTRAL_GIB = 120  # Mixtral-8x7B's bf16 weights alone are 87 GiB: an H200 (141 GB), not an 80 GB card
# name, bench.py arguments, methods (in order), seconds per row, the group whose peft rows it is compared with
PLAN = [
    (OLMOE_4, [], ["attn", "lora", "sieve", "peft-attn", "peft-lora"], 60, None),
    ("olmoe-4x2048-compile", ["--compile"], ["attn", "lora", "sieve"], 120, OLMOE_4),
    ("olmoe-8x2048", ["--batch", "8"], ["lora", "peft-lora"], 60, None),
    ("olmoe-profile-64x2048", ["--batch", "8"], ["profile"], 60, None),
    ("olmoe-4x2048-others", [], ["perft-e", "perft-r", "dmep", "dmep-pruned"], 45, OLMOE_4),
    ("olmoe-4x2048-ckpt", ["--grad-checkpoint"], ["attn", "lora", "sieve", "peft-attn", "peft-lora"], 60, None),
    ("mixtral-8x7b", ["--config", targets.MIXTRAL, "--batch", "1", "--grad-checkpoint", "--steps", "5",
                      "--warmup", "2"], ["lora", "sieve", "peft-lora"], 120, None),
]
STEPS = ["tests"] + [g[0] for g in PLAN]
TINY_MIXTRAL = dict(model_type="mixtral", vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                    max_position_embeddings=128, pad_token_id=1, eos_token_id=2)
STARTUP_S = 60  # a fresh worker's imports and CUDA context, on top of its first row's limit
GRACE_S = 30  # past a row's limit, before a worker that gives no result is taken to hang
MIN_ROW_S = 10  # a row with less time than this left in the budget is skipped, not started
RESTART = 3  # the worker's exit code when a CUDA error has broken its context (the row is already recorded)


def parse_args(argv):
    ap = argparse.ArgumentParser(description="The GPU tests, then bench.py's rows, in one time-limited call.")
    ap.add_argument("--out", required=True, help="an empty or new folder for every result")
    ap.add_argument("--tiny", action="store_true", help="the rehearsal: every step on tiny shapes")
    hub.add_model_flags(ap, model=None, dtype=False)  # --device
    ap.add_argument("--budget", type=float, default=470, help="seconds for the whole run, tests included")
    ap.add_argument("--tests-limit", type=float, default=150, help="seconds for tests/test_gpu.py")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list, in this order: {','.join(STEPS)}")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # plan row indices, for the worker process
    ap.add_argument("--predict", action="store_true", help=argparse.SUPPRESS)  # the predicting process
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() of the budget's end
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    if not steps or set(steps) - set(STEPS):
        ap.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}; choose from {','.join(STEPS)}")
    args.steps = steps
    if args.budget <= 0 or args.tests_limit <= 0:
        ap.error("--budget and --tests-limit must be positive")
    try:
        hub.pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    if args.worker is None and not args.predict and os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        ap.error(f"--out {args.out}: not an empty folder (results of two runs would mix)")
    return args


def rows_of(steps):
    """(plan index, group index, method) of every row the steps name, in plan order."""
    pairs = [(g, m) for g, group in enumerate(PLAN) for m in group[2]]
    return [(i, g, m) for i, (g, m) in enumerate(pairs) if PLAN[g][0] in steps]


def group_args(g, opts):
    """bench.py's parsed arguments and config dict (None: bench's own) for group g."""
    name, argv, _, _, _ = PLAN[g]
    argv = argv + (["--device", opts.device] if opts.device else [])
    cdict = None
    if opts.tiny:
        tiny = ["--seq", "32"] if name.startswith("mixtral") else ["--tiny"]
        argv = argv + tiny + ["--steps", "1", "--warmup", "1", "--compile-backend", "eager"]
        cdict = dict(TINY_MIXTRAL) if name.startswith("mixtral") else None
    args = bench.parse_args(argv)
    return args, cdict or bench.config_dict(args)


def append_row(out, row):
    with open(os.path.join(out, "rows.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_rows(out, name="rows.jsonl"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:  # each row is one write of a line and its newline: what follows the last one is not a row
        lines = f.read().split("\n")[:-1]
    return {r["index"]: r for r in map(json.loads, lines)}


# ----------------------------------------------------------------------------- the worker process

class RowTimeout(BaseException):  # not an Exception: bench.run_row must not record it as an ordinary error
    pass


def on_alarm(signum, frame):
    raise RowTimeout()


def worker(opts, indices):
    """Run the plan rows `indices` in this process, appending each row to rows.jsonl when it ends."""
    device = hub.pick_device(opts.device)
    gpu = targets.device_info(device)
    env = dict(gpu=gpu, versions=bench.versions(), cuda=torch.version.cuda, argv=sys.argv[1:], tiny=opts.tiny)
    with open(os.path.join(opts.out, "env.json"), "w") as f:
        json.dump(env, f, indent=1)
    signal.signal(signal.SIGALRM, on_alarm)
    rows, shared = {i: (g, m) for i, g, m in rows_of(STEPS)}, {}
    for i in indices:
        g, method = rows[i]
        row = dict(index=i, group=PLAN[g][0], method=method)
        left = opts.deadline - time.time()
        if left < MIN_ROW_S:
            row["status"] = f"skipped: {max(left, 0):.0f} s left of the budget"
        elif PLAN[g][0].startswith("mixtral") and not opts.tiny and (gpu["gib"] or 0) < MIXTRAL_GIB:
            row["status"] = f"skipped: Mixtral-8x7B needs a GPU with at least {MIXTRAL_GIB} GiB (an H200)"
        else:
            row.update(timed_row(opts, g, method, min(PLAN[g][3], left), shared))
        append_row(opts.out, row)
        print(f"[gpu_check] {row['group']} {method}: {row['status']}", flush=True)
        if device.type == "cuda" and row["status"] != "ok" and not cuda_alive():
            sys.exit(RESTART)


def timed_row(opts, g, method, limit, shared):
    """One row under a SIGALRM after `limit` seconds; the group's bench arguments and batch are made once."""
    t0 = time.perf_counter()
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        if shared.get("group") != g:
            shared.clear()
            args, cdict = group_args(g, opts)
            shared.update(group=g, args=args, run=bench.prepare(args, cdict))
        args, run = shared["args"], shared["run"]
        result = bench.run_row(method, args, run.cdict, run.ids, run.labels, run.device, run.dtype,
                               measure_profile if method == "profile" else None)
    except RowTimeout:
        result = dict(status=f"timeout: over its {limit:.0f} s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(result, seconds=round(time.perf_counter() - t0, 1))


def measure_profile(name, args, cdict, ids, labels, device, dtype):
    """bench.run_row's measurement for the profile row: router_profile.profile over memory.PROFILE_RECORDS
    records of --seq random tokens in batches of --batch, on bench's random weights, after one batch of
    warm-up: tok/s and the peak of allocated memory (the weights included, as in the prediction)."""
    cfg = moe.Config.from_json(cdict)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = hub.build_empty(cfg, dtype, device)
    train.init_weights(model)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, cfg.vocab_size, (memory.PROFILE_RECORDS, args.seq), generator=g).to(device)
    batches = [(ids[i:i + args.batch], torch.ones_like(ids[i:i + args.batch])) for i in range(0, len(ids), args.batch)]
    router_profile.profile(model, batches[:1])
    bench.sync(device)
    t0 = time.perf_counter()
    router_profile.profile(model, batches)
    bench.sync(device)
    seconds = time.perf_counter() - t0
    return dict(method=name, status="ok", note=f"{len(ids)} records x {args.seq} tokens, batches of {args.batch}",
                trainable=0, step_s=seconds, tok_s=ids.numel() / seconds,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def predict(opts):
    """The --predict process: each row's predicted peak (tools/memory.py, fake tensors on the CPU) appended to
    predicted.jsonl as it is made."""
    for i, g, method in rows_of(opts.steps):
        args, cdict = group_args(g, opts)
        try:
            r = memory.bench_row(method, args, cdict)
            row = dict(predicted_gib=None if r is None else r["peak"] / 2**30,
                       predicted_split_gib=None if r is None else {k: v / 2**30 for k, v in r["split"].items()})
        except Exception as e:  # a prediction that fails must not cost the measurement
            row = dict(predicted_gib=None, predicted_error=f"{type(e).__name__}: {e}")
        with open(os.path.join(opts.out, "predicted.jsonl"), "a") as f:
            f.write(json.dumps(dict(index=i, group=PLAN[g][0], method=method, **row)) + "\n")


def cuda_alive():
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # an illegal address or a device-side assert: every later call in this process fails
        return False


# ----------------------------------------------------------------------------- the supervising process

def worker_command(opts, indices):
    cmd = [sys.executable, "-m", "tools.gpu_check", "--out", opts.out, "--worker", ",".join(map(str, indices)),
           "--deadline", repr(opts.deadline)]
    return cmd + (["--tiny"] if opts.tiny else []) + (["--device", opts.device] if opts.device else [])


def run_tests(opts):
    """tests/test_gpu.py in a pytest subprocess, killed past its limit; what it reported."""
    limit = min(opts.tests_limit, opts.deadline - time.time())
    if importlib.util.find_spec("pytest") is None:
        return dict(status="skipped: pytest is not installed")
    if limit < MIN_ROW_S:
        return dict(status=f"skipped: {max(limit, 0):.0f} s left of the budget")
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/test_gpu.py",
           f"--junitxml={os.path.join(opts.out, 'gpu_tests.xml')}"]
    t0 = time.time()
    with open(os.path.join(opts.out, "gpu_tests.txt"), "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    with open(os.path.join(opts.out, "gpu_tests.txt")) as f:
        last = ([line.strip() for line in f if line.strip()] or [""])[-1]
    status = f"timeout: over its {limit:.0f} s" if rc is None else "passed" if rc == 0 else f"failed (exit {rc})"
    return dict(status=status, pytest=last, seconds=round(time.time() - t0, 1))


def supervise(opts, command=worker_command):
    """Workers run the pending rows; one that hangs past a row's limit + GRACE_S is killed, one that dies is
    replaced, and either way the row it was on is recorded. Rows that the budget cannot reach are skipped."""
    pending = [i for i, _, _ in rows_of(opts.steps)]
    limits = {i: PLAN[g][3] for i, g, _ in rows_of(STEPS)}
    log = open(os.path.join(opts.out, "worker.log"), "a")
    while pending and time.time() < opts.deadline - MIN_ROW_S:
        proc = subprocess.Popen(command(opts, pending), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        since, allowance, hung, given = time.time(), STARTUP_S, False, len(pending)
        while proc.poll() is None:
            time.sleep(0.2)
            done = read_rows(opts.out)
            if any(i in done for i in pending):
                pending = [i for i in pending if i not in done]
                since, allowance = time.time(), 0
                write_summary(opts)
            limit = min(limits[pending[0]], opts.deadline - since) if pending else 0  # none left: it should exit
            if time.time() - since > limit + GRACE_S + allowance:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                hung = True
        done = read_rows(opts.out)
        pending = [i for i in pending if i not in done]
        write_summary(opts)
        if pending and (hung or proc.returncode != RESTART or len(pending) == given):  # RESTART: row recorded
            why = "killed: no result within its limit + grace (hung)" if hung else f"worker exited {proc.returncode}"
            record(opts, pending.pop(0), f"{why}; see worker.log")
    for i in pending:
        record(opts, i, "skipped: out of the budget")
    log.close()


def record(opts, i, status):
    _, g, m = next(r for r in rows_of(STEPS) if r[0] == i)
    append_row(opts.out, dict(index=i, group=PLAN[g][0], method=m, status=status))
    write_summary(opts)


# ----------------------------------------------------------------------------- the summary

def write_summary(opts):
    """summary.json and summary.txt from what is on disk: each group's table and targets (bench.finish)."""
    env_path = os.path.join(opts.out, "env.json")
    env = json.load(open(env_path)) if os.path.exists(env_path) else {}
    gpu = env.get("gpu") or dict(type="unknown", name="?", capability=None, gib=None)
    done, groups, predicted = read_rows(opts.out), [], read_rows(opts.out, "predicted.jsonl")
    lines = [f"gpu_check: {gpu['name']} | {json.dumps(env.get('versions'))} | cuda {env.get('cuda')} | "
             f"{time.time() - opts.start:.0f} of {opts.budget:.0f} s",
             f"tests/test_gpu.py: {opts.tests.get('status', 'not run')} {opts.tests.get('pytest', '')}"]
    for g, (name, _, methods, _, borrow) in enumerate(PLAN):
        if name not in opts.steps:
            continue
        rows = [dict(done.get(i) or dict(method=m, status="not run yet")) for i, gi, m in rows_of(STEPS) if gi == g]
        if borrow:
            rows += [dict(r, note=f"{r['note']} (eager, from {borrow})") for r in map(dict, done.values())
                     if r["group"] == borrow and r["method"].startswith("peft") and r["status"] == "ok"]
        for r in rows:
            r.update({k: v for k, v in predicted.get(r.get("index"), {}).items() if k.startswith("predicted")})
        args, cdict = group_args(g, opts)
        result = bench.finish(rows, args, cdict, gpu)
        if methods == ["profile"]:  # forward passes only: a training step's FLOPs would make its MFU wrong
            for r in rows:
                r["mfu"] = None
            result["table"] = bench.format_table(rows)
        groups.append(dict(name=name, bench_args=PLAN[g][1], rows=rows, **result))
        shown = " ".join(PLAN[g][1]).replace(ROOT + os.sep, "")
        lines += ["", f"== {name}: bench.py {shown}", result["table"], memory_line(rows)]
        lines += [targets.format_targets(result["targets"], result["no_verdict"])] if result["targets"] else []
    summary = dict(env=env, tests=opts.tests, budget_s=opts.budget, elapsed_s=round(time.time() - opts.start, 1),
                   groups=groups)
    for name, text in (("summary.json", json.dumps(summary, indent=1)), ("summary.txt", "\n".join(lines) + "\n")):
        with open(os.path.join(opts.out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(opts.out, name + ".tmp"), os.path.join(opts.out, name))


def memory_line(rows):
    """Each row's peak, predicted (tools/memory.py) / measured (torch.cuda.max_memory_allocated), in GiB."""
    show = lambda v: "-" if v is None else f"{v:.1f}"
    return "memory GiB, predicted / measured: " + " | ".join(
        f"{r['method']} {show(r.get('predicted_gib'))} / {show(r.get('peak_gib'))}" for r in rows)


def start_predicting(opts):
    """The --predict process, beside the tests and the rows (it needs the CPU only)."""
    cmd = [sys.executable, "-m", "tools.gpu_check", "--out", opts.out, "--predict", "--steps", ",".join(opts.steps)]
    cmd += (["--tiny"] if opts.tiny else []) + (["--device", opts.device] if opts.device else [])
    with open(os.path.join(opts.out, "predict.log"), "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def main(argv=None):
    opts = parse_args(sys.argv[1:] if argv is None else list(argv))
    if opts.worker is not None:
        return worker(opts, [int(i) for i in opts.worker.split(",")])
    if opts.predict:
        return predict(opts)
    os.makedirs(opts.out, exist_ok=True)
    opts.start = time.time()
    opts.deadline, opts.tests = opts.start + opts.budget, {}
    predicting = start_predicting(opts)
    write_summary(opts)
    if "tests" in opts.steps:
        opts.tests = run_tests(opts)
        print(f"[gpu_check] tests/test_gpu.py: {opts.tests['status']} {opts.tests.get('pytest', '')}", flush=True)
        write_summary(opts)
    supervise(opts)
    try:  # the predictions are quicker than the rows; what is not done by the deadline is left out
        predicting.wait(max(opts.deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(predicting.pid, signal.SIGKILL)
        predicting.wait()
    write_summary(opts)
    with open(os.path.join(opts.out, "summary.txt")) as f:
        print(f.read(), end="")
    print(f"[gpu_check] wrote {opts.out}: rows.jsonl (one row per line, as measured), predicted.jsonl (the memory "
          "model's peaks), summary.txt / summary.json (tables, predicted and measured peaks, target verdicts), "
          "env.json, gpu_tests.txt / .xml, worker.log, predict.log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
