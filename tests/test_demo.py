"""The README's main command end to end, and the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess

import pandas as pd
import pytest

from multitask import cli
from multitask.demo import PASS_ACCURACY


def test_demo_trains_evaluates_predicts_and_learns(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--out", str(out), "--per-class", "12", "--image-size", "75", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert metrics["organ"]["accuracy"] >= PASS_ACCURACY and metrics["cancer"]["accuracy"] >= PASS_ACCURACY
    for name in ("model.keras", "config.json", "split.csv", "history.csv", "history.png", "report.md",
                 "explain.png", "demo_predictions.csv"):
        assert (out / "run" / name).is_file(), name
    predictions = pd.read_csv(out / "run" / "demo_predictions.csv")
    assert len(predictions) == 8 and predictions["error"].isna().all()
    assert "PASS" in printed and "SYNTHETIC" in printed


@pytest.mark.skipif(shutil.which("multitask") is None, reason="the package is not installed")
def test_installed_command_runs_in_a_fresh_process(tmp_path):
    subprocess.run(["multitask", "demo-data", str(tmp_path), "--per-class", "1", "--size", "80"], check=True)
    result = subprocess.run(["multitask", "scan", str(tmp_path)], capture_output=True, text=True, check=True)
    assert "26 images in 26 subclasses" in result.stdout
    failed = subprocess.run(["multitask", "scan", str(tmp_path / "nope")], capture_output=True, text=True)
    assert failed.returncode == 2 and "does not exist" in failed.stderr
