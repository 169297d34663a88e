"""The embedded default job and the study driver."""
import json
import os

import pytest

import study
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_embedded_default_quick_prints_the_comparison_table(tmp_path, monkeypatch, capsys):
    """`python train.py --quick` (the embedded default, shortened) runs on the shipped model and task and prints
    the attn / lora / sieve / random table with parameters, adapter size, time and accuracy."""
    if not os.path.isdir(os.path.join(HERE, "model")):
        pytest.fail("the shipped model/ directory is missing")
    monkeypatch.chdir(tmp_path)  # outputs go to ./runs/study
    assert train.main(["--quick"]) == 0
    out = capsys.readouterr().out
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
    d, hw = study.paired_interval([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert d == pytest.approx(0.2) and hw == pytest.approx(4.303 * 0.1 / 3 ** 0.5)


def test_unknown_method_is_refused(tmp_path, capsys):
    """--methods with a name train.py does not know: an error naming it, exit 1."""
    assert study.main(["--quick", "--methods", "attn,dora", "--out", str(tmp_path)]) == 1
    assert "dora" in capsys.readouterr().err
