"""Export (issue 12): the three formats pass their self-checks, the ONNX engine answers like Keras, stale exports
are redone and a foreign folder is never overwritten.

The exports are made once per module, from a copy of the session's tiny joint run (75 px, random-init backbone),
because the staleness test rewrites the copy's model.keras; the onnx export goes through the CLI, in-process.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from multitask import cli, export
from multitask.engines import KerasEngine, LiteRtEngine
from multitask.errors import ExportError
from multitask.export import (
    ARTIFACTS,
    EXPORT_FILE,
    LABELS_FILE,
    TOLERANCE,
    check_batch,
    export_dir,
    export_run,
    load_engine,
    model_sha256,
    run_inference_model,
)
from multitask.files import read_json, write_json
from multitask.model import model_parts
from multitask.predict import Predictor
from multitask.rundir import open_run

FP32 = ("tf_saved_model", "onnx")


@pytest.fixture(scope="module")
def run(joint_run, tmp_path_factory):
    """A private copy of the session's joint run, so its model and export folder can change."""
    return shutil.copytree(joint_run, tmp_path_factory.mktemp("export") / "run")


@pytest.fixture(scope="module")
def cli_onnx(run):
    """`multitask export RUN --format onnx`, in-process: (exit code, what it printed)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(["export", str(run), "--format", "onnx"])
    return code, printed.getvalue()


@pytest.fixture(scope="module")
def exports(run, cli_onnx):
    """The fp32 formats' export folders under RUN/export/."""
    export_run(run, format="tf_saved_model")
    return {format: export_dir(run, format) for format in FP32}


@pytest.mark.parametrize("format", FP32)
def test_each_fp32_format_passes_its_self_check(exports, format):
    folder = exports[format]
    assert (folder / ARTIFACTS[format]).exists()
    record = read_json(folder / EXPORT_FILE)
    assert record["format"] == format
    assert set(record["max_abs_diff"]) >= {"organ", "cancer"}
    assert set(record["argmax_agreement"]) == {"organ", "cancer"}
    bars = TOLERANCE[format]
    assert max(record["max_abs_diff"][task] for task in ("organ", "cancer")) <= bars["max_abs_diff"] == 1e-4
    # ood_score is a sum of whitened distances, not a probability: its own bar (measured 2e-5 to 5.4e-4)
    assert record["max_abs_diff"].get("ood_score", 0.0) <= bars["ood_score_max_abs_diff"] == 5e-3
    assert record["argmax_agreement"] == {"organ": 1.0, "cancer": 1.0}
    assert sorted(p.name for p in folder.iterdir()) == sorted([ARTIFACTS[format], LABELS_FILE, EXPORT_FILE])


@pytest.fixture(scope="module")
def int8_file(run, tmp_path_factory) -> Path:
    """The run's int8 model, converted once; the tests below publish it under the bars they choose."""
    path = tmp_path_factory.mktemp("int8") / ARTIFACTS["int8"]
    export._write_int8(run_inference_model(open_run(run), ood=False), path)
    return path


def _reuse(int8_file: Path):
    """A stand-in for export._write_int8 that copies the file already converted (saves ~20 s per export)."""
    return lambda inference, artifact: shutil.copyfile(int8_file, artifact)


@pytest.fixture(scope="module")
def int8_cli(run, int8_file):
    """`multitask export RUN --format int8` under the product's own bars: (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        patch.setattr(export, "_write_int8", _reuse(int8_file))
        code = cli.main(["export", str(run), "--format", "int8"])
    return code, stdout.getvalue(), stderr.getvalue()


def test_int8_export_of_a_random_init_run_passes_within_its_bars_or_refuses_cleanly(run, int8_cli):
    """A random-init 75 px model is int8's worst case (tiny feature spread), and its rounding differs between CPU
    instruction sets and kernels: measured organ max difference 0.074-0.078 (XNNPACK, two AVX-512 CPUs) and 0.137
    (LiteRT's reference kernels), against a bar of 0.25 (set on the default recipe's runs). So no accuracy is
    promised here, only behaviour: either the export is published with its numbers within the bars, or it exits 2,
    names the numbers and writes nothing. Both branches are forced below; int8 accuracy is tested on a
    pretrained real-sample run at the default size, 299 px (tests/test_real_default.py)."""
    code, printed, error = int8_cli
    folder = export_dir(run, "int8")
    bars = TOLERANCE["int8"]
    if code == 0:
        record = read_json(folder / EXPORT_FILE)
        assert max(record["max_abs_diff"].values()) <= bars["max_abs_diff"]
        assert min(record["argmax_agreement"].values()) >= bars["argmax_agreement"]
        assert "self-check" in printed
    else:
        assert code == 2, (code, error)
        line = error.strip()
        assert "\n" not in line and "does not reproduce the Keras model" in line, line
        named = [float(x) for x in re.findall(r"(?:organ|cancer)[^0-9]*([0-9.]+(?:e-?[0-9]+)?)", line)]
        assert named and (max(named) > bars["max_abs_diff"] or min(named) < bars["argmax_agreement"]), line
        assert not folder.exists() and not [p for p in folder.parent.glob(".*") if "int8" in p.name]


def test_int8_export_that_passes_its_bars_publishes_what_its_engine_answers(run, int8_file, monkeypatch, tmp_path):
    """The pass branch, reached on any CPU by bars every int8 file meets: the export is published with its record,
    and `--engine int8` answers with Keras' columns less the two ood ones."""
    monkeypatch.setitem(TOLERANCE, "int8", {"max_abs_diff": 1.0, "argmax_agreement": 0.0})
    monkeypatch.setattr(export, "_write_int8", _reuse(int8_file))
    out = tmp_path / "int8"
    result = export_run(run, format="int8", out=out, check_images=8)
    record = read_json(out / EXPORT_FILE)
    assert record["format"] == "int8" and record["artifact"] == ARTIFACTS["int8"] == "model.int8.tflite"
    assert set(record["max_abs_diff"]) == {"organ", "cancer"} == set(result.max_abs_diff)  # no ood_score in int8
    assert sorted(p.name for p in out.iterdir()) == sorted([ARTIFACTS["int8"], LABELS_FILE, EXPORT_FILE])

    images, _ = check_batch(open_run(run), 8)
    keras_out = KerasEngine(run_inference_model(open_run(run), ood=False))(images)
    int8_out = LiteRtEngine(out / ARTIFACTS["int8"])(images)
    assert set(int8_out) == {"organ", "cancer"}
    for task in ("organ", "cancer"):
        np.testing.assert_allclose(int8_out[task].sum(axis=1), 1.0, atol=1e-3)
        # the numbers the record names are the ones the engine gives
        assert np.abs(int8_out[task] - keras_out[task]).max() == pytest.approx(record["max_abs_diff"][task], abs=1e-6)


def test_an_export_that_fails_its_check_publishes_nothing(run, int8_file, monkeypatch, tmp_path):
    """The refuse branch, reached on any CPU by a bar no int8 model meets: the export raises, names the numbers, and
    leaves no folder or temp behind."""
    monkeypatch.setitem(TOLERANCE, "int8", {"max_abs_diff": 0.0, "argmax_agreement": 1.0})
    monkeypatch.setattr(export, "_write_int8", _reuse(int8_file))
    out = tmp_path / "int8"
    with pytest.raises(ExportError, match=r"int8 export .* does not reproduce the Keras model .*nothing was written"):
        export_run(run, format="int8", out=out, check_images=8)
    assert list(tmp_path.iterdir()) == []


def test_labels_json_says_what_a_client_needs(exports, run):
    info = open_run(run)
    labels = read_json(exports["onnx"] / LABELS_FILE)
    assert labels["organ_labels"] == list(info.labels["organ"])
    assert labels["cancer_labels"] == list(info.labels["cancer"])
    assert labels["malignancy_threshold"] == info.malignancy_threshold
    # the per-organ operating points, by organ (the tiny run's organs all fall back to the global one)
    assert labels["malignancy_thresholds"] == {organ: {"threshold": row["threshold"], "source": row["source"]}
                                               for organ, row in info.organ_thresholds.items()}
    assert list(labels["malignancy_thresholds"]) == labels["organ_labels"]
    assert labels["image_size"] == info.image_size == 75
    assert "float32" in labels["input_format"] and "0..255" in labels["input_format"]


def test_onnx_graph_takes_only_the_image(exports):
    graph = onnx.load(str(exports["onnx"] / ARTIFACTS["onnx"])).graph
    initializers = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    assert [i.name for i in inputs] == ["image"]
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim]
    assert dims[1:] == [75, 75, 3]
    assert {o.name for o in graph.output} >= {"organ", "cancer"}


def test_onnx_outputs_are_calibrated_probabilities(exports, run):
    info = open_run(run)
    images, _ = check_batch(info, 8)
    onnx_out = load_engine(info, "onnx")(images)
    keras_out = KerasEngine(run_inference_model(info))(images)
    for task in ("organ", "cancer"):
        np.testing.assert_allclose(onnx_out[task].sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(onnx_out[task], keras_out[task], atol=1e-4)


def test_onnx_predictor_matches_keras(exports, run, demo_data):
    files = sorted(str(p) for p in demo_data.rglob("*.jpg"))[::13] + [str(demo_data / "missing.jpg")]
    keras_frame = Predictor.from_run(run).predict(files)
    onnx_frame = Predictor.from_run(run, engine="onnx").predict(files)
    assert list(onnx_frame.columns) == list(keras_frame.columns)
    for column in ("path", "organ", "cancer", "error"):
        assert onnx_frame[column].tolist() == keras_frame[column].tolist()
    probabilities = [c for c in keras_frame.columns if c.startswith("p_") or c.endswith("_prob")]
    np.testing.assert_allclose(onnx_frame[probabilities].to_numpy(float), keras_frame[probabilities].to_numpy(float),
                               atol=1e-4)
    assert onnx_frame["error"].notna().sum() == 1  # the missing file, in both


def test_cli_export_prints_the_check(cli_onnx):
    code, printed = cli_onnx
    assert code == 0
    assert "self-check" in printed
    assert "organ" in printed and "cancer" in printed and "max |difference|" in printed
    assert "argmax agreement 100.0%" in printed


def test_stale_export_is_redone(exports, run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    info = open_run(copy)
    old_sha = read_json(export_dir(info, "onnx") / EXPORT_FILE)["model_sha256"]
    model = info.load_model()
    dense = model_parts(model).heads.get_layer("organ")
    kernel, *rest = dense.get_weights()
    dense.set_weights([kernel * 3.0, *rest])  # a different model: answers move
    model.save(info.model_path)
    assert model_sha256(info.model_path) != old_sha
    config = read_json(copy / "config.json")  # as a retrain would record it (issue 21: loading checks the hash)
    write_json({**config, "model_sha256": model_sha256(info.model_path)}, copy / "config.json")
    info = open_run(copy)

    engine = load_engine(copy, "onnx")  # stale: exported again, and checked against the new model
    record = read_json(export_dir(info, "onnx") / EXPORT_FILE)
    assert record["model_sha256"] == model_sha256(info.model_path)
    images, _ = check_batch(info, 8)
    new = KerasEngine(run_inference_model(open_run(copy)))(images)
    for task in ("organ", "cancer"):
        np.testing.assert_allclose(engine(images)[task], new[task], atol=1e-4)


def test_export_refuses_a_foreign_folder(run, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="notes.txt"):
        export_run(run, format="onnx", out=out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "keep me"


def test_int8_engine_without_litert_names_the_package(monkeypatch, tmp_path):
    from multitask.engines import LiteRtEngine
    from multitask.errors import ConfigError

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=r"ai-edge-litert is missing.*multitask\[export\]"):
        LiteRtEngine(tmp_path / "model.int8.tflite")


def test_a_failed_check_says_what_to_do_without_a_dict(run):
    """Issue 20: int8 was refused with a Python dict and "check the package versions"; now the message is readable
    and names the format to use instead."""
    from types import SimpleNamespace

    info = SimpleNamespace(path=Path("runs/rs160"), image_size=160)
    record = {"format": "int8", "max_abs_diff": {"organ": 0.004, "cancer": 0.362},
              "argmax_agreement": {"organ": 1.0, "cancer": 1.0}, "images": 32, "tolerance": TOLERANCE["int8"],
              "versions": {"tensorflow": "2.21.0"}}
    with pytest.raises(ExportError) as failed:
        export._raise_if_failed(record, info=info)
    message = str(failed.value)
    assert "{" not in message and "cancer 0.362" in message and "organ 0.004" not in message
    assert "max |difference| 0.25 per head, argmax agreement >= 93%" in message
    assert "at 160 px" in message and "--format onnx" in message and "package versions" not in message
    onnx_record = {**record, "format": "onnx", "tolerance": TOLERANCE["onnx"]}
    with pytest.raises(ExportError, match=r"converter is at fault \(tensorflow 2\.21\.0\)"):
        export._raise_if_failed(onnx_record, info=info)


def test_export_folder_has_the_mode_mkdir_gives(exports):
    """Not mkdtemp's owner-only 0700 (issue 20): 0777 less the umask, like any folder the user makes."""
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for folder in exports.values():
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask
