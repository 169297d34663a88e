"""The study's generated tasks (pretrain/tasks.py): checkable answers, disjoint splits, reproducible files."""
import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(HERE, "pretrain"))
import tasks  # noqa: E402  (pretrain/ is not a package: the generator is also a script)


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_answers_are_right_and_splits_disjoint(name):
    """Every gold choice is the recomputed answer (independently of check_record: from the numbers and words in
    the query), choices are distinct, gold positions are spread, and no query is in both splits."""
    train, val = tasks.make(name, 300, 100)
    for rec in train + val:
        inner = rec["query"].split("\n")[0]
        if name == "words":
            want = len(inner.split('"')[1].split(" "))
        else:
            nums = [int(t.strip("?")) for t in inner.split() if t.strip("?").isdigit()]
            want = max(nums) if name == "max" else len(nums)
        assert rec["choices"][rec["gold"]] == str(want), rec
        assert len(set(rec["choices"])) == len(rec["choices"]) == 4 and rec["query"].endswith("\nAnswer:")
    assert not {r["query"] for r in train} & {r["query"] for r in val}
    golds = [r["gold"] for r in train]
    assert min(golds.count(i) for i in range(4)) > 0.15 * len(golds)  # no position cue (uniform: 0.25)


def test_word_task_validation_uses_unseen_words():
    """The word task's validation phrases use only words that no train phrase uses."""
    train, val = tasks.make("words", 300, 100)
    words = lambda recs: {w for r in recs for w in r["query"].split('"')[1].split()}  # noqa: E731
    assert words(train) and words(val) and not words(train) & words(val)


def test_check_record_refuses_a_wrong_gold():
    rec = dict(id="x", query="Question: the largest of 10 20 30 40 50 is\nAnswer:", choices=["50", "40", "30", "20"],
               gold=1)
    with pytest.raises(ValueError, match="expected '50'"):
        tasks.check_record("max", rec)


def test_generation_is_reproducible_and_matches_the_committed_files(tmp_path, capsys):
    """The same seed gives the same records, and tasks/ holds exactly what `python pretrain/tasks.py` writes."""
    assert tasks.make("count", 50, 20) == tasks.make("count", 50, 20)
    assert tasks.main(["--check"]) == 0, capsys.readouterr().out
    assert tasks.main(["--tasks", "max", "--n-train", "5", "--n-val", "3", "--out", str(tmp_path)]) == 0
    assert len((tmp_path / "max.val.jsonl").read_text().splitlines()) == 3
    assert json.loads((tmp_path / "max.train.jsonl").read_text().splitlines()[0])["id"] == "max-train-0"


def test_bad_arguments_exit_2_naming_the_flag(tmp_path, capsys):
    for argv, flag in ((["--tasks", "sort"], "--tasks"), (["--out", str(tmp_path / "no")], "--out")):
        with pytest.raises(SystemExit) as e:
            tasks.main(argv)
        assert e.value.code == 2 and flag in capsys.readouterr().err
