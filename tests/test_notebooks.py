"""Both notebooks run top to bottom on a fresh clone (synthetic data, tiny settings) and produce outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TINY = {"MT_IMAGE_SIZE": "75", "MT_EPOCHS": "1", "MT_FINE_TUNE_EPOCHS": "0", "MT_PER_CLASS": "6",
        "MT_WEIGHTS": "none", "TF_CPP_MIN_LOG_LEVEL": "2"}


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
    notebook = execute("02_joint_vs_separate.ipynb", runs_dir, monkeypatch)
    for task in ("joint", "organ", "cancer"):
        assert (runs_dir / task / "config.json").is_file()
    conclusions = outputs_of(notebook, "text/markdown")[-1]["data"]["text/markdown"]
    assert "Organ head" in conclusions and "Cancer head" in conclusions and "{" not in conclusions
    assert len(outputs_of(notebook, "image/png", "image/jpeg")) >= 2  # confusion matrices, training curves
