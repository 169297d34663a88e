"""The embedded default job and the study driver."""
import importlib.util
import json
import math
import os
import runpy
import statistics
import sys

import pytest

from tools import claims
import router_profile
from tools import study

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_default_quick_prints_the_comparison_table(tmp_path, monkeypatch, capsys):
    """`python -m tools.study --default --quick` (the embedded default, shortened) runs on the shipped model and
    task and prints the attn / lora / sieve / random table with parameters, adapter size, time and accuracy."""
    if not os.path.isdir(os.path.join(HERE, "model")):
        pytest.fail("the shipped model/ directory is missing")
    monkeypatch.chdir(tmp_path)  # outputs go to ./runs/study
    monkeypatch.setattr(sys, "argv", ["tools/study.py", "--default", "--quick"])
    with pytest.raises(SystemExit) as e:  # as `python -m tools.study` runs it
        runpy.run_module("tools.study", run_name="__main__")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "needs >= 3 seeds" in out and "less per step (controlled: median step of sieve vs lora" in out
    assert "trainable" in out and "adapter MB" in out and "acc - lora" in out
    for method in ("attn", "lora", "sieve", "random"):
        assert any(line.startswith(method) for line in out.splitlines()), method
    result = json.loads(next((tmp_path / "runs" / "study").glob("*.json")).read_text())
    assert {row["method"] for row in result["table"]} == {"attn", "lora", "sieve", "random"}
    sieve_row = next(r for r in result["table"] if r["method"] == "sieve")
    lora_row = next(r for r in result["table"] if r["method"] == "lora")
    assert sieve_row["params"] < lora_row["params"]


def test_paired_interval():
    """The paired 95% t-interval: mean difference and t(0.975, n-1) * sd / sqrt(n)."""
    d, hw = claims.paired_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert d == pytest.approx(0.2) and hw == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_unknown_method_is_refused(tmp_path, capsys):
    """--methods with a name train.py does not know: an error naming it, exit 1."""
    assert study.main(["--quick", "--methods", "attn,dora", "--out", str(tmp_path)]) == 1
    assert "dora" in capsys.readouterr().err


def test_report_reprints_a_saved_study_with_paired_intervals(tmp_path, capsys):
    """--report reads a study's JSON and prints the table and the claims, each comparison paired over seeds."""
    def run(seed, acc, nll, params):
        return dict(seed=seed, acc=acc, acc_norm=acc, nll=nll, params=params, adapter_bytes=4 * params, train_s=10.0)
    runs = {m: [run(s, a + 0.01 * s, n - 0.001 * s, p) for s in range(3)]
            for m, a, n, p in (("lora", 0.50, 2.0, 1000), ("sieve", 0.49, 2.1, 300), ("random", 0.47, 2.2, 300))}
    f = tmp_path / "study.json"
    f.write_text(json.dumps(dict(task="toy", steps=5, seeds=3, rank=4, base=dict(acc=0.4, acc_norm=0.4, gold_nll=2.5),
                                 runs=runs)))
    assert study.main(["--report", str(f)]) == 0
    out = capsys.readouterr().out
    assert "toy: 3 seed(s), 5 steps, r=4" in out
    assert ("random 25% about 2.5 pp worse than top-25% -> random - sieve: -2.0 pp [±0.0] (gold nll/char +0.1000 "
            "[±0.0000]) with 300 vs 300 parameters -> reproduces") in out
    assert "70.0% fewer" in out


def test_bad_flags_and_report_files_are_refused(tmp_path, capsys):
    """--seeds 0 or --limit 0: an argparse error (exit 2); --report on a missing file or a JSON that is not a
    study's result, or --out an existing file: an error naming the file, exit 1, no traceback, before any run."""
    for flag in (["--seeds", "0"], ["--limit", "0"]):
        with pytest.raises(SystemExit) as e:
            study.main(["--quick", "--out", str(tmp_path), *flag])
        assert e.value.code == 2 and flag[0] in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"task": "t"}')
    for f in (tmp_path / "missing.json", tmp_path / "other.json"):
        assert study.main(["--report", str(f)]) == 1
        assert str(f) in capsys.readouterr().err
    assert study.main(["--quick", "--methods", "attn", "--out", str(tmp_path / "other.json")]) == 1  # a file
    assert "other.json: exists and is not a directory" in capsys.readouterr().err


def test_one_seed_gives_no_verdict_and_time_comes_from_the_controlled_timing(tmp_path, capsys):
    """With fewer than 3 seeds the accuracy claims say "needs >= 3 seeds" (no interval, no verdict); the time
    claims come from the study's controlled timing (naming the device), never from the runs' own step times,
    and say "not timed" without one."""
    def run(acc, params, step_s):
        return dict(seed=0, acc=acc, acc_norm=acc, nll=2.0, params=params, adapter_bytes=4 * params, train_s=99.0,
                    step_s=step_s, device="cpu", trainable_before_prune=2 * params)
    runs = dict(lora=[run(0.5, 1000, 0.9)], sieve=[run(0.49, 300, 0.1)], dmep=[run(0.47, 600, 0.5)])
    timing = dict(device="some CPU, 1 thread", steps=60, step_s=dict(lora=0.2, sieve=0.15, dmep=0.3),
                  dmep_tok_s=[1000.0, 1100.0])
    res = dict(task="toy", steps=5, seeds=1, rank=4, base=dict(acc=0.4, acc_norm=0.4, gold_nll=2.5), runs=runs)
    f, g = tmp_path / "timed.json", tmp_path / "untimed.json"
    f.write_text(json.dumps(dict(res, timing=timing)))
    g.write_text(json.dumps(res))
    assert study.main(["--report", str(f)]) == 0
    out = capsys.readouterr().out
    assert "within ±1 pp of full LoRA -> sieve - lora: needs >= 3 seeds (have 1)" in out and "[±" not in out
    assert ("up to 50% less training time -> 25.0% less per step (controlled: median step of sieve vs lora 0.150s vs "
            "0.200s, one process alone on some CPU, 1 thread)") in out
    assert "~10% more throughput after pruning -> +10.0% (controlled: tok/s before -> after pruning 1,000 -> 1,100" in out
    assert "DMEP: 35-43% fewer trainable parameters after pruning -> 50.0% fewer" in out
    assert study.main(["--report", str(g)]) == 0
    out = capsys.readouterr().out
    assert "up to 50% less training time -> not timed" in out and "after pruning -> not timed" in out


def test_any_jobs_give_the_same_numbers_and_compare_checks_them(tmp_path, capsys):
    """The runs' numbers do not depend on --jobs (each run has --threads threads, whatever process runs it):
    --jobs 2 and --jobs 1 give exactly the same accuracies, so --compare passes; a study whose numbers differ
    (one accuracy edited) fails --compare (exit 1) naming the run; the timing, study.txt and the plot are written."""
    argv = ["--quick", "--tasks", "max", "--methods", "lora,sieve", "--seeds", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert study.main([*argv, "--jobs", "2", "--out", str(a)]) == 0
    res = json.loads((a / "max.json").read_text())
    assert res["timing"]["step_s"].keys() == {"lora", "sieve"} and "thread" in res["timing"]["device"]
    assert (a / "study.txt").read_text().count("claims (paper -> measured here") == 1
    if importlib.util.find_spec("matplotlib"):
        assert (a / "accuracy_params.png").read_bytes()[:4] == b"\x89PNG"
    assert study.main([*argv, "--jobs", "1", "--out", str(b), "--compare", str(a)]) == 0
    assert "compare: max: 4 of 4 runs give exactly the numbers of" in capsys.readouterr().out
    assert study.main([*argv, "--out", str(b), "--compare", str(tmp_path / "nowhere")]) == 1  # before any run
    assert "nowhere: it has no max.json" in capsys.readouterr().err
    assert study.main([*argv, "--out", str(a), "--compare", str(a)]) == 1  # it would compare a study with itself
    assert "is --out" in capsys.readouterr().err
    res["runs"]["sieve"][1]["acc"] += 0.25
    (a / "max.json").write_text(json.dumps(res))
    assert study.main([*argv, "--jobs", "1", "--out", str(b), "--compare", str(a)]) == 1
    out = capsys.readouterr().out
    assert "3 of 4 runs" in out and "sieve seed 1: acc" in out


def test_finished_runs_are_reused_only_with_the_same_settings(tmp_path, capsys, monkeypatch):
    """A second study into the same --out reuses the finished runs (result.json with the same settings: after
    Ctrl-C the same command goes on); a changed flag (--lr) or a changed task file's contents trains again.
    Ctrl-C inside a run (train.py catches it, checkpoints and returns 130) ends the study with 130, saying so."""
    recs = [json.loads(line) for line in open(os.path.join(HERE, "tasks", "max.val.jsonl"))][:8]
    task = tmp_path / "tasks"
    task.mkdir()
    for split in ("train", "val"):
        (task / f"t.{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["--quick", "--tasks", "t", "--tasks-dir", str(task), "--methods", "attn", "--seeds", "1", "--jobs", "1",
            "--timing-steps", "0", "--out", str(tmp_path / "out")]
    assert study.main(argv) == 0
    capsys.readouterr()
    assert study.main(argv) == 0
    assert "t attn seed 0: acc" in (out := capsys.readouterr().out) and "(reused" in out
    assert study.main([*argv, "--lr", "1e-3"]) == 0
    assert "(reused" not in capsys.readouterr().out
    (task / "t.train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[::-1]))  # same names
    assert study.main([*argv, "--lr", "1e-3"]) == 0
    assert "(reused" not in capsys.readouterr().out

    import train
    monkeypatch.setattr(train, "main", lambda argv: 130)  # what train.py returns after a caught Ctrl-C
    assert study.main([*argv, "--lr", "2e-3"]) == 130
    assert "the same command goes on" in capsys.readouterr().err


def test_a_failing_run_stops_the_study_without_hanging(tmp_path, capsys):
    """A run that train.py refuses (here --seq-len beyond the model's positions) in one of two workers: the study
    stops with exit 1 naming the run and its output file (which has train.py's reason), the other worker is
    killed rather than waited for, and no table is written."""
    argv = ["--quick", "--tasks", "max", "--methods", "attn", "--seeds", "4", "--jobs", "2", "--seq-len", "100000",
            "--timing-steps", "0", "--out", str(tmp_path)]
    assert study.main(argv) == 1
    err = capsys.readouterr().err
    assert "train.py --method attn --seed" in err and "failed" in err and "output.txt" in err
    outputs = list(tmp_path.glob("runs/max/attn/seed*/output.txt"))
    assert outputs and any("--seq-len" in p.read_text() for p in outputs)
    assert not (tmp_path / "max.json").exists()


def test_random_jaccard_matches_enumeration():
    """The expected overlap of two random top-k sets (the routing table's reference line), against every pair
    of k-subsets of n experts enumerated."""
    import itertools
    for k, n in ((1, 4), (2, 5), (3, 8)):
        sets = list(itertools.combinations(range(n), k))
        want = statistics.mean(len(set(a) & set(b)) / len(set(a) | set(b)) for a in sets for b in sets)
        assert router_profile.random_jaccard(k, n) == pytest.approx(want, rel=1e-12)
    # 4 of 16 (the shipped model's top 25%): the same enumeration over 1820^2 pairs, run once, gave this
    assert router_profile.random_jaccard(4, 16) == pytest.approx(0.1579748822559908, rel=1e-9)


def _run(seed, acc, params=1000, nll=2.0):
    return dict(seed=seed, acc=acc, acc_norm=acc, nll=nll, params=params, adapter_bytes=4 * params, train_s=1.0)


def _study(tmp_path, name, runs, task="toy", seeds=5):
    f = tmp_path / name
    base = dict(acc=0.25, acc_norm=0.25, gold_nll=3.0)
    f.write_text(json.dumps(dict(task=task, steps=5, seeds=seeds, rank=4, base=base, runs=runs)))
    return str(f)


def test_verdicts_follow_the_stated_rules(tmp_path, capsys):
    """Each claim's verdict comes from its 95% interval: sieve inside ±1 pp of lora -> reproduces; random
    3 pp below sieve -> reproduces; budget 2 pp above sieve with a tight interval -> contradicts; perft-r as
    good as attn (interval below +1 pp) -> contradicts; dmep 0.5 pp below with a wide interval -> inconclusive."""
    noise = [0.001, -0.001, 0.002, -0.002, 0.0]  # small per-seed wobble: tight intervals
    wide = [0.02, -0.02, 0.01, -0.01, 0.0]
    def rs(base, wobble=noise, params=1000):
        return [_run(s, base + w, params) for s, w in enumerate(wobble)]
    runs = dict(lora=rs(0.60), sieve=rs(0.602), random=rs(0.572), budget=rs(0.622), attn=rs(0.50, params=100),
                **{"perft-r": rs(0.50, params=110), "dmep": rs(0.595, wide)})
    for r in runs["dmep"]:
        r["trainable_before_prune"] = 1600
    assert study.main(["--report", _study(tmp_path, "s.json", runs)]) == 0
    out = {line.split(" -> ")[0].strip(): line for line in capsys.readouterr().out.splitlines() if " -> " in line}
    verdict = {k: v.rsplit(" -> ", 1)[1].split()[0] for k, v in out.items() if "[±" in v}
    assert verdict == {"MoE-Sieve: top-25% within ±1 pp of full LoRA": "reproduces",
                       "MoE-Sieve: random 25% about 2.5 pp worse than top-25%": "reproduces",
                       "MoE-Sieve: greedy budget no consistent gain over uniform top-k": "contradicts",
                       "PERFT: routed adapters beat plain PEFT (2.3-5.7 pp): PERFT-R vs attention LoRA, ~same size":
                           "contradicts",
                       "DMEP: pruned LoRA-MoE keeps full LoRA's accuracy (within ±1 pp)": "inconclusive"}


def test_report_merges_files_of_the_same_task_and_plots(tmp_path, capsys):
    """Two studies of one task (method groups run in parallel) are joined into one table; --out writes the
    merged JSON; --plot draws accuracy against trainable parameters."""
    a = _study(tmp_path, "a.json", dict(lora=[_run(s, 0.6) for s in range(3)]), seeds=3)
    b = _study(tmp_path, "b.json", dict(sieve=[_run(s, 0.59 + 0.001 * s, 300) for s in range(3)]), seeds=3)
    png, out = tmp_path / "acc.png", tmp_path / "merged"
    assert study.main(["--report", a, b, "--plot", str(png), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "within ±1 pp of full LoRA -> sieve - lora: -0.9 pp" in text
    merged = json.loads((out / "toy.json").read_text())
    assert set(merged["runs"]) == {"lora", "sieve"} and merged["claims"][0]["verdict"] == "inconclusive"
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_any_task_file_pair_runs(tmp_path, capsys):
    """--train / --val take any task files (formats as train.py); a missing file or a lone --train is refused."""
    recs = [dict(query=f"Question: how many numbers are in {' '.join(['1'] * n)}?\nAnswer:",
                 choices=[str(n), str(n + 1)], gold=0) for n in range(2, 8)]
    tr, va = tmp_path / "mine.train.jsonl", tmp_path / "mine.val.jsonl"
    for f in (tr, va):
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    argv = ["--quick", "--train", str(tr), "--val", str(va), "--methods", "attn", "--out", str(tmp_path)]
    assert study.main(argv) == 0
    assert json.loads((tmp_path / "mine.json").read_text())["runs"]["attn"][0]["params"] > 0
    assert study.main(["--quick", "--train", str(tr), "--val", str(tmp_path / "no.jsonl"), "--out", str(tmp_path)]) == 1
    assert "no.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        study.main(["--quick", "--train", str(tr)])
    assert e.value.code == 2


def test_routing_compares_the_tasks_top_experts(tmp_path, capsys):
    """--routing profiles each task on the shipped model and prints CV / cold / coverage and the per-layer
    Jaccard overlap of the tasks' top-25% sets (|A & B| / |A | B| of the sets it saved)."""
    assert study.main(["--routing", "--tasks", "max,words", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cov@25%" in out and "max/words" in out
    res = json.loads((tmp_path / "routing.json").read_text())
    a, b = res["top25"]["max"], res["top25"]["words"]
    assert all(len(a[k]) == 4 for k in a)  # 25% of 16 experts in each of the 4 layers
    assert res["jaccard"]["max/words"] == [len(set(a[k]) & set(b[k])) / len(set(a[k]) | set(b[k])) for k in a]


def test_report_pools_the_tasks_pairing_task_and_seed(tmp_path, capsys):
    """With several tasks, the claims are also printed over every (task, seed) pair: 2 tasks x 3 seeds = 6 pairs,
    t(0.975, 5) = 2.571. Runs are matched on (task, seed), not on their place in the list: lora varies by seed
    and one file lists its sieve seeds in reverse, so pairing by position would give other differences."""
    lora_acc = [0.60, 0.70, 0.50]
    files = []
    for t, d, order in (("t1", [0.01, 0.02, 0.03], [0, 1, 2]), ("t2", [0.0, -0.01, 0.01], [2, 1, 0])):
        runs = dict(lora=[_run(s, lora_acc[s]) for s in range(3)],
                    sieve=[_run(s, lora_acc[s] + d[s], 300) for s in order])
        files.append(_study(tmp_path, f"{t}.json", runs, task=t, seeds=3))
    assert study.main(["--report", *files]) == 0
    out = capsys.readouterr().out
    assert "t2: 3 seed(s)" in out and "sieve - lora: +0.0 pp [±2.5]" in out  # t2 alone: mean 0, 4.303 * 0.01 / sqrt 3
    pooled = out.split("all 2 tasks pooled (t1, t2)")[1]
    d = [1, 2, 3, 0, -1, 1]
    hw = 2.571 * statistics.stdev(d) / math.sqrt(6)
    assert f"sieve - lora: +1.0 pp [±{hw:.1f}]" in pooled


def test_report_refuses_a_method_in_two_files_of_one_task(tmp_path, capsys):
    """Merging files of one task joins their methods; the same method in both (two results of one run) is an
    error naming both files, not a silent choice."""
    a = _study(tmp_path, "a.json", dict(lora=[_run(s, 0.6) for s in range(3)]), seeds=3)
    b = _study(tmp_path, "b.json", dict(lora=[_run(s, 0.5) for s in range(3)]), seeds=3)
    assert study.main(["--report", a, b]) == 1
    err = capsys.readouterr().err
    assert "lora" in err and "a.json" in err and "b.json" in err


def test_methods_whose_size_varies_by_seed_are_shown_by_their_mean(tmp_path, capsys):
    """DMEP prunes by use, so its trainable count differs by seed: the table and the claims use the mean."""
    runs = dict(lora=[_run(s, 0.6, 1000) for s in range(3)],
                dmep=[dict(_run(s, 0.6, p), trainable_before_prune=800) for s, p in enumerate((500, 600, 700))])
    assert study.main(["--report", _study(tmp_path, "d.json", runs, seeds=3)]) == 0
    out = capsys.readouterr().out
    assert "with 600 vs 1,000 parameters" in out and "60.0%" in out and "25.0% fewer" in out


def test_plain_quick_trains_as_the_fast_default(tmp_path, monkeypatch):
    """`python -m tools.study --default --plain --quick` runs the default job on moe.py's plain code and gives the fast
    default's losses: per step within 1e-5 relative (fp32, ~a few hundred roundings of unit roundoff 6e-8 each
    between two summation orders of the same products, far below a real difference), and the same methods."""
    logs = {}
    for name, extra in (("fast", []), ("plain", ["--plain"])):
        monkeypatch.chdir(tmp_path)
        monkeypatch.setattr(sys, "argv", ["tools/study.py", "--default", "--quick", *extra])
        with pytest.raises(SystemExit) as e:
            runpy.run_module("tools.study", run_name="__main__")
        assert e.value.code == 0
        runs = sorted((tmp_path / "runs" / "study" / "runs").glob("max/*/seed0/log.jsonl"))
        logs[name] = {p.parent.parent.name: [json.loads(x)["loss"] for x in p.read_text().splitlines()] for p in runs}
        os.rename(tmp_path / "runs", tmp_path / f"runs-{name}")
    assert set(logs["fast"]) == set(logs["plain"]) == {"attn", "lora", "sieve", "random"}
    for method, losses in logs["fast"].items():
        assert logs["plain"][method] == pytest.approx(losses, rel=1e-5), method
