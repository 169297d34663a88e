"""gpu_check.py, the one-command GPU measurement, rehearsed on the CPU: every step of the plan runs, each row is
written as it ends, a row over its limit, a hung worker and a dead one are recorded and the run goes on."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import bench
from tools import gpu_check

ROOT = Path(__file__).resolve().parent.parent


def read_rows(out):
    return [json.loads(line) for line in (Path(out) / "rows.jsonl").read_text().splitlines()]


def test_tiny_rehearsal_runs_every_step_of_the_plan(tmp_path):
    """`gpu_check.py --tiny --device cpu` runs the whole plan as the GPU call would (a subprocess, as on the
    device): the GPU tests (skipped cleanly without CUDA), then every row of every group, in plan order, each
    ok; the summary has every group's table and its targets' ratios, with no verdict on a CPU, and every row's
    predicted peak beside the measured one."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "tools.gpu_check", "--tiny", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = read_rows(out)
    plan = [(gpu_check.PLAN[g][0], m) for _, g, m in gpu_check.rows_of(gpu_check.STEPS)]
    assert [(r["group"], r["method"]) for r in rows] == plan
    assert all(r["status"] == "ok" and r["tok_s"] > 0 for r in rows), [r["status"] for r in rows]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["status"] == "passed" and "skipped" in summary["tests"]["pytest"]
    assert [g["name"] for g in summary["groups"]] == gpu_check.STEPS[1:]
    assert summary["env"]["gpu"]["type"] == "cpu" and summary["env"]["tiny"]
    text = (out / "summary.txt").read_text()
    verdicts = [line for line in text.splitlines() if line.startswith("target: ")]
    assert verdicts and all(line.endswith(": no verdict") for line in verdicts), verdicts
    assert "(eager, from olmoe-4x2048)" in text  # the compiled rows compared with the eager peft rows
    assert (out / "gpu_tests.xml").exists() and text in proc.stdout
    # the memory model's prediction beside the measured peak (None on a CPU) for every row, the profile row's tok/s
    predicted = [json.loads(line) for line in (out / "predicted.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in predicted) == [r["index"] for r in rows]
    for g in summary["groups"]:
        for r in g["rows"]:
            assert "peak_gib" in r and (r["predicted_gib"] is None) == (r["method"] == "dmep-pruned"), r
            assert r["predicted_gib"] is None or r["predicted_gib"] > 0 and sum(r["predicted_split_gib"].values()) > 0
    assert text.count("memory GiB, predicted / measured: ") == len(gpu_check.PLAN)
    profile = next(r for r in rows if r["method"] == "profile")
    assert profile["group"] == "olmoe-profile-64x2048" and "64 records" in profile["note"]


def opts_for(tmp_path, *extra):
    opts = gpu_check.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path / "out"), *extra])
    (tmp_path / "out").mkdir(parents=True, exist_ok=True)
    opts.start, opts.tests = time.time(), {}
    opts.deadline = opts.start + opts.budget
    return opts


def test_a_row_over_its_limit_is_recorded_and_the_next_row_runs(tmp_path, monkeypatch):
    """In the worker, a row past its limit is ended by the alarm and recorded as a timeout; the next row runs in
    the same process."""
    monkeypatch.setattr(gpu_check, "PLAN", [("olmoe-4x2048", [], ["attn", "lora"], 1, None)])

    def run_row(name, *args):
        if name == "attn":
            time.sleep(30)
        return dict(method=name, status="ok")

    monkeypatch.setattr(bench, "run_row", run_row)
    opts = opts_for(tmp_path)
    t0 = time.time()
    gpu_check.worker(opts, [0, 1])
    rows = read_rows(opts.out)
    assert [(r["method"], r["status"]) for r in rows] == [("attn", "timeout: over its 1 s"), ("lora", "ok")]
    assert time.time() - t0 < 20


def test_a_hung_or_dead_worker_is_recorded_and_replaced(tmp_path, monkeypatch):
    """The supervisor kills a worker that gives no result within the row's limit + grace and records that row;
    a worker that dies is recorded the same way; a fresh worker is started for each next row, also after one
    that recorded its row and exited because its CUDA context is broken (no second record of that row)."""
    monkeypatch.setattr(gpu_check, "PLAN", [("olmoe-4x2048", [], ["attn", "lora"], 1, None)])
    monkeypatch.setattr(gpu_check, "STARTUP_S", 0)
    monkeypatch.setattr(gpu_check, "GRACE_S", 0.5)
    monkeypatch.setattr(gpu_check, "MIN_ROW_S", 0)
    started = []

    def hangs(opts, indices):
        started.append(list(indices))
        return [sys.executable, "-c", "import time; time.sleep(60)"]

    opts = opts_for(tmp_path, "--steps", "olmoe-4x2048")
    gpu_check.supervise(opts, hangs)
    assert started == [[0, 1], [1]]
    assert all(r["status"].startswith("killed: no result") for r in read_rows(opts.out))
    assert time.time() - opts.start < 20

    opts = opts_for(tmp_path / "b", "--steps", "olmoe-4x2048")
    gpu_check.supervise(opts, lambda opts, indices: [sys.executable, "-c", "raise SystemExit(1)"])
    assert [r["status"] for r in read_rows(opts.out)] == ["worker exited 1; see worker.log"] * 2
    summary = json.loads((Path(opts.out) / "summary.json").read_text())
    assert [r["status"] for r in summary["groups"][0]["rows"]] == ["worker exited 1; see worker.log"] * 2

    started.clear()  # a worker that records its row, then exits because an error broke its CUDA context

    def breaks(opts, indices):
        started.append(list(indices))
        row = json.dumps(dict(index=indices[0], group="olmoe-4x2048", method="?", status="error: CUDA error"))
        return [sys.executable, "-c", f"open({str(Path(opts.out) / 'rows.jsonl')!r}, 'a').write({row!r} + '\\n'); "
                f"raise SystemExit({gpu_check.RESTART})"]

    opts = opts_for(tmp_path / "c", "--steps", "olmoe-4x2048")
    gpu_check.supervise(opts, breaks)
    assert started == [[0, 1], [1]] and [r["status"] for r in read_rows(opts.out)] == ["error: CUDA error"] * 2


def test_rows_the_budget_cannot_reach_are_skipped_and_summarised(tmp_path, capsys):
    """With no time left every step is recorded as skipped and the summary is still written; --steps picks
    groups (the rows keep their plan indices)."""
    out = tmp_path / "out"
    assert gpu_check.main(["--tiny", "--device", "cpu", "--out", str(out), "--budget", "1",
                           "--steps", "tests,olmoe-8x2048"]) == 0
    rows = read_rows(out)
    assert [(r["method"], r["status"]) for r in rows] == [("lora", "skipped: out of the budget"),
                                                          ("peft-lora", "skipped: out of the budget")]
    assert [r["index"] for r in rows] == [i for i, g, _ in gpu_check.rows_of(gpu_check.STEPS) if g == 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tests"]["status"].startswith("skipped") and [g["name"] for g in summary["groups"]] == ["olmoe-8x2048"]
    assert "skipped: out of the budget" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--steps", "tests,nope"], "--steps"), (["--device", "tpu9"], "--device"), (["--budget", "0"], "--budget")])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(out), *argv])
    assert e.value.code != 0 and message in capsys.readouterr().err and not out.exists()


def test_an_output_folder_with_results_in_it_is_refused(tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--out", str(tmp_path)])
    assert "--out" in capsys.readouterr().err and (tmp_path / "rows.jsonl").read_text() == "{}\n"
