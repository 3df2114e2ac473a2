"""A missing optional extra (issue 20 item 1): one line, exit status 2, naming the `pip install` to run, before any
slow work (loading the model, converting it: int8 spent 22 s converting before it said LiteRT was missing)."""

from __future__ import annotations

import sys

import pytest

from multitask import cli, export
from multitask.extras import NEEDS, missing_modules
from multitask.rundir import RunInfo


@pytest.fixture
def no_slow_work(monkeypatch):
    """Loading the run's model or building its inference graph fails the test: the check must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("slow work started before the missing package was named")

    monkeypatch.setattr(export, "run_inference_model", refuse)
    monkeypatch.setattr(RunInfo, "load_model", refuse)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("format, module", [("onnx", "onnx"), ("onnx", "tf2onnx"), ("int8", "ai_edge_litert")])
def test_export_without_its_extra_names_the_pip_install(joint_run, format, module, monkeypatch, capsys,
                                                        no_slow_work):
    before = sorted(p.name for p in joint_run.iterdir())
    monkeypatch.setitem(sys.modules, module, None)  # imports and find_spec fail as if it were not installed
    assert cli.main(["export", str(joint_run), "--format", format]) == 2
    line = one_line(capsys)
    assert line.startswith("multitask export: error:") and "pip install 'multitask[export]'" in line
    assert sorted(p.name for p in joint_run.iterdir()) == before  # nothing written


def test_predict_engine_without_its_runtime_names_the_pip_install(joint_run, demo_data, monkeypatch, capsys,
                                                                  no_slow_work):
    image = next(demo_data.rglob("*.jpg"))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["predict", str(joint_run), str(image), "--engine", "onnx"]) == 2
    line = one_line(capsys)
    assert "onnxruntime not installed" in line and "pip install 'multitask[export]'" in line


def test_serve_without_fastapi_names_the_pip_install(joint_run, monkeypatch, capsys, no_slow_work):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve", str(joint_run)]) == 2
    line = one_line(capsys)
    assert "fastapi not installed" in line and "pip install 'multitask[serve]'" in line


def test_every_use_is_installed_with_the_dev_extras():
    """The test environment installs .[dev], which pulls both extras: nothing is missing here."""
    assert {use: missing_modules(use) for use in NEEDS} == {use: [] for use in NEEDS}
