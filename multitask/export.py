"""Export a run for serving engines: TF SavedModel, ONNX (fp32) and int8, each checked against Keras before it counts.

Every format holds the run's **inference graph** (:func:`multitask.inference.inference_model`): one input,
``image``, float32 RGB in 0..255, NHWC at the run's image size (the single scaling to [-1, 1] stays inside the
graph), one output per head holding PROBABILITIES (the run's temperatures folded in), and ``ood_score`` when the
run has an out-of-distribution detector (not in int8: see ``WITHOUT_OOD``). Beside each artifact::

    labels.json   labels per head, malignancy thresholds (global and per organ), image size, input format, outputs
    export.json   the self-check: max |probability difference| and argmax agreement per head against the Keras
                  model on the run's own val/test images, and the sha256 of model.keras (a stale export is redone)

An export is written into a temporary sibling folder and renamed only after its self-check passed, so
``RUN/export/<format>/`` is either a checked artifact or absent.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.data import load_image
from multitask.engines import Engine, KerasEngine, LiteRtEngine, OnnxEngine, SavedModelEngine
from multitask.errors import ConfigError, ExportError
from multitask.extras import require_extra
from multitask.files import TEMP_TAG, file_sha256, read_json, remove_stale_dirs, temp_dir, write_json
from multitask.guard import check_output
from multitask.inference import OOD_SCORE, inference_model, output_names
from multitask.rundir import EXPORT_DIR, RunInfo, claim_files, open_run, reading_run
from multitask.settings import ENGINES, EXPORT_CHECK_IMAGES, EXPORT_FORMATS
from multitask.splits import load_split

log = logging.getLogger(__name__)

FORMATS = EXPORT_FORMATS
ARTIFACTS = {"tf_saved_model": "saved_model", "onnx": "model.onnx", "int8": "model.int8.tflite"}
EARLIER_ARTIFACTS = ("model.int8.onnx",)  # int8 was ONNX Runtime static QDQ once: such a folder is still ours
EXTRA_FORMATS = ("onnx", "int8")  # need the `export` extra (multitask.extras); tf_saved_model needs only TensorFlow
LABELS_FILE = "labels.json"
EXPORT_FILE = "export.json"
INPUT_FORMAT = "float32 RGB 0..255, NHWC, shape [N, S, S, 3]"
# The self-check's bars: fp32 formats reproduce Keras up to float rounding; int8 must keep every answer.
# ood_score is not a probability: a sum of standardised distances (multitask.ood), tens for foreign images and
# thresholded around 5-15, so its bar is its own (fp32: float32 rounding of 768-feature sums; int8 has no
# ood_score: see WITHOUT_OOD).
# Each bar is the largest difference measured under every kernel set (scripts/numerics_spread.py: all of oneDNN's
# ISA, ONEDNN_MAX_CPU_ISA=AVX2, and LiteRT's XNNPACK, builtin and reference kernels), with a margin of about 2x:
# - fp32 probabilities: <= 1e-6 on the real-sample runs, 6e-6 on a random-init 75 px one (bar 1e-4);
# - fp32 ood_score: 5.4e-4 on the real-sample runs at 256 px, 8.2e-4 at 299 px (bar 5e-3: scores are ~1-10,
#   thresholded near 9);
# - int8 probabilities on the default recipe's runs (pretrained, 299 px, fine-tuned at 1e-4; seeds 42, 7, 1234):
#   organ up to 0.104, cancer up to 0.030 (the largest under LiteRT's reference kernels; XNNPACK at full ISA and
#   AVX2 alike 0.092 / 0.026); the reproducible rerun's runs of that recipe up to 0.102 / 0.044 (reference
#   kernels). The earlier default (fine-tuned at 1e-5) read organ 0.005-0.127 (XNNPACK), cancer 0.027-0.060
#   (reference kernels); at 256 px 0.021-0.063 and 0.028-0.035 (bar 0.25, about twice the largest).
#   Answers flip only at near ties: none of 32 on today's default, 1 of 32 (a cancer near tie) under the reference
#   kernels on the earlier one (bar: argmax agreement >= 93%, two flips of 32). A random-init 75 px model reads
#   0.07-0.14.
TOLERANCE = {
    "tf_saved_model": {"max_abs_diff": 1e-4, "argmax_agreement": 1.0, "ood_score_max_abs_diff": 5e-3},
    "onnx": {"max_abs_diff": 1e-4, "argmax_agreement": 1.0, "ood_score_max_abs_diff": 5e-3},
    "int8": {"max_abs_diff": 0.25, "argmax_agreement": 0.93},
}
# Formats exported without ood_score. int8: its activations are rounded to 8 bits, then whitened (multitask.ood),
# which amplifies the rounding along the training images' low-variance directions: on the real-sample run (256 px)
# the LiteRT int8 ood_score differed from Keras' by up to 2.3 (median 0.47) on its 87 test images, against a
# threshold of 8.9, and flagged 4 where Keras flagged 3. A score that loose would flag or pass borderline images at
# random, so int8 predictions carry no ood columns (use onnx or keras for them).
WITHOUT_OOD = ("int8",)


# ----------------------------------------------------------------------------------------------- export a run


@dataclass(frozen=True)
class ExportResult:
    """A checked export: where it is and how closely it reproduces the Keras model."""

    format: str
    path: Path  # the folder holding the artifact, labels.json and export.json
    artifact: Path
    max_abs_diff: dict[str, float]
    argmax_agreement: dict[str, float]
    images: int
    seconds: float


def export_dir(run: str | os.PathLike | RunInfo, format: str) -> Path:
    """Default folder of ``format``'s export of a run: ``RUN/export/<format>/``."""
    info = run if isinstance(run, RunInfo) else open_run(run)
    return info.path / EXPORT_DIR / _check_format(format)


def model_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file (model.keras), which tells a stale export from a current one."""
    return file_sha256(path)


def export_run(run_dir: str | os.PathLike | RunInfo, *, format: str, out: str | os.PathLike | None = None,
               check_images: int = EXPORT_CHECK_IMAGES) -> ExportResult:
    """Export a run as ``format``, check it against the Keras model on the run's own images, then publish it.

    Written into a temporary sibling of ``out`` (default ``RUN/export/<format>/``) and renamed only after the
    self-check passed; a failed check raises :class:`ExportError` and leaves ``out`` as it was. The run is read
    under a shared lock (a ``train --overwrite`` of it is refused meanwhile); ``out`` is checked first
    (:func:`multitask.guard.check_output`), and temporary folders a killed export left beside it are removed.
    """
    with reading_run(run_dir) as info:
        return _export(info, format=format, out=out, check_images=check_images)


def _export(info: RunInfo, *, format: str, out: str | os.PathLike | None, check_images: int) -> ExportResult:
    start = time.perf_counter()
    format = _check_format(format)
    if format in EXTRA_FORMATS:
        require_extra(f"{format} export")  # before loading and converting (int8: ~20 s)
    out = Path(out).expanduser() if out is not None else export_dir(info, format)
    if check_images < 1:
        raise ExportError(f"--check-images must be positive, got {check_images}")
    check_output(out, flag="$out", folder=True, data=info.data_roots(), run=info.path)
    _refuse_foreign(out)
    if out.parent.resolve() == (info.path / EXPORT_DIR).resolve():
        claim_files(info.path, [EXPORT_DIR])  # first: derived from the model, an overwritten run must not keep it
    remove_stale_dirs(out.parent, out.name)  # what a killed export left (a whole model each)
    sha = model_sha256(info.model_path)  # before loading: the file the export is known to match
    inference = run_inference_model(info, ood=format not in WITHOUT_OOD)
    tmp = temp_dir(out.parent, out.name)
    try:
        artifact = tmp / ARTIFACTS[format]
        writer = {"tf_saved_model": _write_saved_model, "onnx": _write_onnx, "int8": _write_int8}[format]
        writer(inference, artifact)
        images, files = check_batch(info, check_images)
        reference = KerasEngine(inference)(images)
        exported = open_engine(artifact, format=format)(images)
        diff, agreement = compare(reference, exported, tasks=info.tasks)
        record = {"format": format, "max_abs_diff": diff, "argmax_agreement": agreement, "model_sha256": sha,
                  "images": len(images), "check_files": files, "tolerance": TOLERANCE[format],
                  "artifact": artifact.name, "versions": _versions(format)}
        _raise_if_failed(record, info=info)
        write_json(labels_record(info, inference), tmp / LABELS_FILE)
        write_json(record, tmp / EXPORT_FILE)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s to %s", format, out)
    return ExportResult(format=format, path=out, artifact=out / ARTIFACTS[format], max_abs_diff=diff,
                        argmax_agreement=agreement, images=len(images), seconds=time.perf_counter() - start)


def _refuse_foreign(out: Path) -> None:
    """Refuse an ``out`` that holds anything but one earlier export: replacing it must never delete user files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file, not a folder; choose another --out")
    ours = {LABELS_FILE, EXPORT_FILE, *ARTIFACTS.values(), *EARLIER_ARTIFACTS}
    found = sorted(entry.name for entry in out.iterdir())
    foreign = [name for name in found if name not in ours]
    if foreign or (found and EXPORT_FILE not in found):
        shown = ", ".join(foreign or found)
        raise ExportError(f"--out {out} holds files that are not an export of ours ({shown[:200]}); nothing was "
                          "written: choose an empty or new folder")


def _check_format(format: str) -> str:
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    return format


def run_inference_model(info: RunInfo, *, calibrated: bool = True, ood: bool = True):
    """The run's inference graph: its temperatures (unless not ``calibrated``) and its OOD detector (unless not
    ``ood``) folded in."""
    return inference_model(info.load_model(), temperatures=info.temperatures if calibrated else None,
                           ood=info.load_ood() if ood else None)


def check_batch(info: RunInfo, n: int) -> tuple[np.ndarray, list[str]]:
    """Up to ``n`` of the run's test (then val) images, decoded as the model sees them, and their paths."""
    manifest = load_split(info.split_path, taxonomy=info.taxonomy)
    pool = pd.concat([manifest[manifest["split"] == s] for s in ("test", "val")])
    if pool.empty:
        raise ExportError(f"{info.split_path} has no val or test images to check the export with")
    files = pool["path"].head(n).tolist()
    return load_images(files, info.image_size), files


def load_images(files: list[str], image_size: int) -> np.ndarray:
    """Decode and resize ``files`` exactly as prediction does: float32 (N, S, S, 3) in 0..255."""
    images = [load_image(path, image_size).numpy() for path in files]
    return np.stack(images).astype(np.float32)


def compare(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], *,
            tasks: Iterable[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Max |difference| per output, and argmax agreement (share of images) per task, of two engines' outputs."""
    missing = sorted(set(reference) - set(other))
    if missing:
        raise ExportError(f"the exported model lacks output(s) {missing}; it has {sorted(other)}")
    diff = {name: float(np.max(np.abs(np.asarray(other[name]) - reference[name]))) for name in reference}
    agreement = {task: float(np.mean(np.argmax(other[task], -1) == np.argmax(reference[task], -1)))
                 for task in tasks}
    return diff, agreement


def _raise_if_failed(record: dict, *, info: RunInfo) -> None:
    tolerance = record["tolerance"]
    allowed = {OOD_SCORE: tolerance.get("ood_score_max_abs_diff", tolerance["max_abs_diff"])}
    failed = {name: x for name, x in record["max_abs_diff"].items()
              if not x <= allowed.get(name, tolerance["max_abs_diff"])}
    failed |= {f"{task} argmax agreement": x for task, x in record["argmax_agreement"].items()
               if not x >= tolerance["argmax_agreement"]}
    if failed:
        shown = ", ".join(f"{name} {x:.3g}" for name, x in failed.items())
        bars = (f"max |difference| {tolerance['max_abs_diff']:g} per head, argmax agreement "
                f">= {tolerance['argmax_agreement']:.0%}")
        if record["format"] == "int8":
            advice = (f"int8 rounds too coarsely for this run at {info.image_size} px (pretrained runs at the "
                      "default 299 px pass; smaller images and random-init backbones round worse): export --format "
                      "onnx instead, fp32 with Keras' answers (predict --engine onnx)")
        else:
            versions = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
            advice = (f"an fp32 export should match to float rounding, so the converter is at fault ({versions}): "
                      "try another package version, or export another format")
        raise ExportError(f"the {record['format']} export of {info.path} does not reproduce the Keras model on "
                          f"{record['images']} of its images ({shown}; allowed: {bars}); nothing was written. "
                          f"{advice}")


def labels_record(info: RunInfo, inference) -> dict:
    """What a serving client needs beside the artifact: labels, operating points, input format, output names."""
    return {
        "organ_labels": list(info.labels.get("organ", [])),
        "cancer_labels": list(info.labels.get("cancer", [])),
        "malignancy_threshold": info.malignancy_threshold,
        "malignancy_thresholds": {organ: {"threshold": row["threshold"], "source": row["source"]}
                                  for organ, row in info.organ_thresholds.items()},
        "ood_threshold": info.ood_threshold if OOD_SCORE in output_names(inference) else None,
        "image_size": info.image_size,
        "input_name": "image",
        "input_format": INPUT_FORMAT,
        "output_names": list(output_names(inference)),
        "outputs": "probabilities per head (softmax of logits / temperature); ood_score: higher is more unlike the "
                   "training images, flagged above ood_threshold; Malignant when P(Malignant) >= "
                   "malignancy_thresholds[predicted organ].threshold (the organ's own, or the global one where it "
                   "had too few validation images), or >= malignancy_threshold where that table is empty",
    }


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished ``tmp`` folder at ``out``; an older export there is removed only once ``tmp`` is whole."""
    from multitask.files import give_default_mode

    give_default_mode(tmp)  # mkdtemp made it owner-only; the published folder reads like any other
    if out.exists():
        old = out.with_name(f".{out.name}{TEMP_TAG}{os.getpid()}-old")  # remove_stale_dirs knows it if we are killed
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _versions(format: str) -> dict[str, str]:
    from importlib import metadata

    names = {"tf_saved_model": ("tensorflow", "keras"), "onnx": ("keras", "tf2onnx", "onnx", "onnxruntime"),
             "int8": ("tensorflow", "keras", "ai-edge-litert")}
    found = {}
    for name in names[format]:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


# ----------------------------------------------------------------------------------------------- writers


def _image_spec(inference):
    import tensorflow as tf

    return [tf.TensorSpec((None, *inference.input_shape[1:]), tf.float32, name="image")]


def _write_saved_model(inference, artifact: Path) -> None:
    # Keras' exporter adds the `serving_default` signature TF Serving calls; the batch dimension stays open.
    inference.export(str(artifact), format="tf_saved_model", verbose=False, input_signature=_image_spec(inference))


def _write_onnx(inference, artifact: Path) -> None:
    inference.export(str(artifact), format="onnx", verbose=False, input_signature=_image_spec(inference))


def _write_int8(inference, artifact: Path) -> None:
    """LiteRT dynamic-range int8: int8 weights (per channel), activations quantised per image at run time.

    Chosen by measurement on the real-sample run (256 px, pretrained, batch 32; README, Export). Static
    quantisation, whose activation ranges are fixed on calibration images, rounds too coarsely for this model:
    the pooled features vary little between images (median spread 0.005 around a mean of 0.016) and the heads
    read those small differences. ONNX Runtime static QDQ (per-channel weights, MinMax or percentile ranges,
    heads or the last blocks kept in fp32) left the pooled features 8% off (relative L2), which moved
    probabilities by up to 0.81 (organ) / 0.38 (cancer) on the test split. Ranges measured per image leave
    them 3% off: 0.05 / 0.08 on the whole test split, and 3x Keras' images/s through XNNPACK. No calibration
    images are needed, so the export has none to choose.

    The converter reads the SavedModel that Keras exports (``serving_default``, batch dimension open), so the
    LiteRT file keeps its named signature: input ``image``, one output per head.
    """
    import tensorflow as tf

    saved = artifact.with_name("saved_model.tmp")
    _write_saved_model(inference, saved)
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        converter.optimizations = [tf.lite.Optimize.DEFAULT]  # without a representative dataset: dynamic range
        artifact.write_bytes(converter.convert())
    finally:
        shutil.rmtree(saved, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- engines of a run


def open_engine(artifact: str | os.PathLike, *, format: str) -> Engine:
    """The engine that runs an exported artifact of ``format``."""
    if format == "tf_saved_model":
        return SavedModelEngine(artifact)
    if format == "int8":
        return LiteRtEngine(artifact, name=format)
    return OnnxEngine(artifact, name=format)


def is_current(folder: str | os.PathLike, info: RunInfo, *, format: str) -> bool:
    """Whether ``folder`` holds a checked export of ``format`` made from the run's current model.keras."""
    try:
        record = read_json(Path(folder) / EXPORT_FILE)
    except (OSError, ValueError):
        return False
    artifact = ARTIFACTS[format]  # an export in an earlier artifact format (EARLIER_ARTIFACTS) is stale
    return (record.get("format") == format and record.get("artifact") == artifact
            and record.get("model_sha256") == model_sha256(info.model_path) and (Path(folder) / artifact).exists())


def require_engine_extras(info: RunInfo, name: str) -> None:
    """Before any loading: the packages engine ``name`` needs, and those of its export when that must be made first
    (missing or stale); a missing one raises :class:`ConfigError` naming the ``pip install``."""
    if name in EXTRA_FORMATS:
        require_extra(f"{name} engine")
        if not is_current(export_dir(info, name), info, format=name):
            require_extra(f"{name} export")


def load_engine(run: str | os.PathLike | RunInfo, name: str = "keras", *, model=None,
                calibrated: bool = True) -> Engine:
    """The run's engine ``name`` (keras, onnx, int8); exports ``RUN/export/<format>/`` first if missing or stale.

    ``model`` (the run's loaded Keras model) saves loading it again for the keras engine.
    """
    info = run if isinstance(run, RunInfo) else open_run(run)
    if name not in ENGINES:
        raise ConfigError(f"unknown $engine {name!r}; choose one of {', '.join(ENGINES)}")
    require_engine_extras(info, name)
    if name == "keras":
        if model is None:
            return KerasEngine(run_inference_model(info, calibrated=calibrated))
        return KerasEngine(inference_model(model, temperatures=info.temperatures if calibrated else None,
                                           ood=info.load_ood()))
    folder = export_dir(info, name)
    if not is_current(folder, info, format=name):
        why = "is stale (model.keras changed)" if folder.exists() else "does not exist yet"
        log.info("%s %s: exporting it first", folder, why)
        export_run(info, format=name, out=folder)
    return open_engine(folder / ARTIFACTS[name], format=name)
