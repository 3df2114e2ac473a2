"""Both notebooks run top to bottom on a fresh clone (synthetic data, tiny settings) and produce outputs.

They execute in memory: the committed notebooks (02 holds its outputs on the real sample) are never rewritten.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from multitask import rundir

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY = {"MT_IMAGE_SIZE": "75", "MT_EPOCHS": "1", "MT_FINE_TUNE_EPOCHS": "0", "MT_PER_CLASS": "6",
        "MT_WEIGHTS": "none", "MT_RESAMPLES": "50", "MT_DATA_DIR": "", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebook_runs")


def execute(name: str, runs_dir: Path, monkeypatch) -> nbformat.NotebookNode:
    for key, value in {**TINY, "MT_RUNS_DIR": str(runs_dir)}.items():
        monkeypatch.setenv(key, value)  # the kernel inherits this environment
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return notebook


def outputs_of(notebook, *kinds: str) -> list:
    return [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
            if any(kind in o.get("data", {}) for kind in kinds)]


def printed(notebook) -> str:
    """Everything the notebook printed or displayed as text."""
    return "".join(o.get("text", "") + o.get("data", {}).get("text/plain", "")
                   for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", []))


def test_dataset_notebook_runs_and_saves_the_split(runs_dir, monkeypatch):
    notebook = execute("01_dataset.ipynb", runs_dir, monkeypatch)
    assert len(outputs_of(notebook, "image/png", "image/jpeg")) >= 3  # bar charts, balance, image grid
    assert (runs_dir / "split.csv").is_file()
    text = printed(notebook)
    assert "156 images in 26 subclasses" in text and "Total" in text


def test_comparison_notebook_trains_compares_and_concludes(runs_dir, monkeypatch):
    committed = (NOTEBOOKS / "02_joint_vs_separate.ipynb").read_bytes()
    notebook = execute("02_joint_vs_separate.ipynb", runs_dir, monkeypatch)
    assert (NOTEBOOKS / "02_joint_vs_separate.ipynb").read_bytes() == committed
    for task in ("joint", "organ", "cancer"):
        assert rundir.open_run(runs_dir / f"{task}-frozen").config["settings"]["task"] == task
    markdown = [o["data"]["text/markdown"] for o in outputs_of(notebook, "text/markdown")]
    provenance, conclusions = markdown[0], markdown[-1]
    assert "SYNTHETIC demo data" in provenance and re.search(r"156 images,\s+26 subclasses", provenance)
    assert "random initialisation" in provenance and "75 px" in provenance
    quality = next(o["data"]["text/plain"] for o in outputs_of(notebook, "text/plain") if "roc_auc" in
                   o["data"]["text/plain"])
    assert re.search(r"\d\.\d{3} \(\d\.\d{3}-\d\.\d{3}\)", quality)  # every value with its interval
    verdicts = [line for line in conclusions.splitlines() if line.startswith("- **organ") or
                line.startswith("- **cancer")]
    assert len(verdicts) == 3  # one per compared metric (frozen only here)
    assert all(("no winner" in line) != ("is better" in line) for line in verdicts)
    assert "SYNTHETIC" in conclusions and "{" not in conclusions
    assert len(outputs_of(notebook, "image/png", "image/jpeg")) >= 2  # confusion matrices, training curves
