"""Shared fixtures: one tiny synthetic dataset and split per test session, reused by every module.

The suite runs on two pytest-xdist workers (pyproject's addopts: ``-n 2 --dist loadfile
--no-loadscope-reorder``: a whole module per worker, in the order of FIRST below). Each session fixture that costs
something (the data, the runs) is built once per test session, by the first worker that needs it, in a folder both
workers see, under a file lock (:func:`shared`); the other worker waits and reuses it. ``pytest -n 0`` runs
everything in one process, as before.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # The workers share the machine's cores: each gets its share of threads for TensorFlow's ops (intra-op) AND for
    # running independent ops side by side (inter-op: InceptionV3's parallel branches), and for OpenMP / OpenBLAS
    # (numpy, scikit-learn). Set in the environment, so the processes a test starts (notebook kernels, CLI runs)
    # inherit it. Measured on 2 cores: 705 s of pytest with the intra-op share alone, 596 s with all four one commit
    # later (which also dropped ~30 s of validation passes from one worker); notebook 02 alone went 110 s -> 48 s.
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _share = str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _threads in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_threads, _share)

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Two logical CPU devices so tf.distribute.MirroredStrategy can be tested without GPUs. This must run
# before TensorFlow initialises its devices, hence here at import time.
_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(_cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "real-sample"
# Built by ../shared/tools/pretrained-weights (.ci/run does it where ../shared exists): the offline stand-in for
# ImageNet weights. Users' clones have neither, so the tests that need them skip.
PRETRAINED_WEIGHTS = Path(os.environ.get("MULTITASK_PRETRAINED_WEIGHTS", Path.home() / ".cache" / "multitask"
                                         / "inception_v3_pretrained_notop.weights.h5"))
REAL_IMAGE_SIZE = 160
IMAGE_SIZE = 75  # InceptionV3's minimum: the cheapest size that exercises the real architecture
# joint_run's training settings; the multi-worker test trains a cluster with the same ones to compare against it.
JOINT_SETTINGS = {"epochs": 8, "learning_rate": 3e-3, "patience": 8}


# The modules that take longest start first, so neither worker is left with a long one at the end (pytest
# --durations, 2 cores: the real-sample runs, the notebooks, the exports, the multi-worker pair). The notebooks come
# second so that the other worker starts on them, not waiting for the real split the first one is making.
FIRST = ("test_real_default.py", "test_notebooks.py", "test_real_sample.py", "test_ood.py", "test_export.py",
         "test_scale_out.py", "test_train.py", "test_safety.py", "test_explain.py", "test_accelerate.py",
         "test_demo.py")


def pytest_collection_modifyitems(items) -> None:
    """Put the slowest modules first (stable: each module keeps its own order)."""
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))


# The suite loads the same few run models ~80 times (~1.5 s each) and traces an inference graph for nearly every
# one (~1.3 s at 75 px; measured with a timing plugin and cProfile): each worker keeps the last few of each.
KEPT_MODELS = 6
KEPT_GRAPHS = 12


def _lru(size: int):
    """A small least-recently-used memo: ``memo(key, make)`` returns the value kept under ``key``, or makes it."""
    from collections import OrderedDict

    kept = OrderedDict()

    def memo(key, make):
        if key not in kept:
            kept[key] = make()
            while len(kept) > size:
                kept.popitem(last=False)
        kept.move_to_end(key)
        return kept[key]

    return memo


def _detector_key(ood) -> str | None:
    """What an OOD detector puts into the inference graph, as a SHA-256 (None without one)."""
    import hashlib

    import numpy as np

    if ood is None:
        return None
    digest = hashlib.sha256(repr((ood.block_names, ood.threshold)).encode())
    for block in ood.blocks:
        for value in (block.means, block.whiten, block.centre, block.scale):
            digest.update(np.ascontiguousarray(value, np.float64).tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def loaded_models_are_shared():
    """Each worker keeps the last KEPT_MODELS models that runs loaded (``RunInfo.load_model``'s file read and safe
    load, :func:`multitask.runcheck.load_checked_model`), keyed by the file's identity (path, inode, size, mtime)
    and the image size it is checked against: a file that was replaced, changed or damaged is read and checked
    again, and ``load_model`` still checks the run's recorded hash every time. Likewise the last KEPT_GRAPHS
    inference graphs built from a kept model (keyed by that model, the temperatures and the OOD detector's
    values) and their traced Keras engines. A test that changes a loaded model in memory loads it with
    ``keras.models.load_model`` itself, or changes a copied run (a new key)."""
    from multitask import export, rundir

    load, build, engine = rundir.load_checked_model, export.inference_model, export.KerasEngine
    models, graphs, engines = _lru(KEPT_MODELS), _lru(KEPT_GRAPHS), _lru(KEPT_GRAPHS)

    def shared_load(path, *, image_size, config_path):
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, image_size)
        return models(key, lambda: load(path, image_size=image_size, config_path=config_path))

    def shared_graph(model, *, temperatures=None, ood=None):
        key = (id(model), tuple(sorted((temperatures or {}).items())), _detector_key(ood))
        # the model is kept with its graph, so its id cannot be reused by another model while the entry lives
        return graphs(key, lambda: (model, build(model, temperatures=temperatures, ood=ood)))[1]

    def shared_engine(inference):
        return engines(id(inference), lambda: (inference, engine(inference)))[1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rundir, "load_checked_model", shared_load)
        patch.setattr(export, "inference_model", shared_graph)
        patch.setattr(export, "KerasEngine", shared_engine)
        yield


def shared(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
    """``build(folder)``'s result, built once per test session into ``folder`` even when several xdist workers ask:
    the first builds under a lock, the others wait and reuse it. A build that failed is redone, never reused."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder, above each worker's own
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.parent / f"{name}.done"
    with FileLock(str(folder) + ".lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a half-built one from a failed build: ours, in the tmp dir
            folder.mkdir()
            done.write_text(str(build(folder)))
    return Path(done.read_text())


def _present(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not present: {path}")
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A synthetic dataset in the Kaggle layout: 26 subclasses x 12 images of 96 px (no bad files)."""
    from multitask.synthetic import generate

    return shared(tmp_path_factory, "demo", lambda folder: generate(folder, per_class=12, size=96, seed=0))


@pytest.fixture(scope="session")
def demo_split_csv(demo_data, tmp_path_factory) -> Path:
    """A saved 70/15/15 split manifest of ``demo_data`` (seed 42)."""
    from multitask.data import scan
    from multitask.splits import save_split, split_manifest

    return shared(tmp_path_factory, "split",
                  lambda folder: save_split(split_manifest(scan(demo_data), seed=42), folder / "split.csv"))


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The 818 real images of all 9 organs beside the developers' checkout; skipped in users' clones."""
    return _present(REAL_SAMPLE, "the shared real sample")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for the session's runs (same seed, same random backbone: its features are reused)."""
    return shared(tmp_path_factory, "feature-cache", lambda folder: folder)


def tiny_run(out: Path, split_csv: Path, cache: Path, **settings) -> Path:
    """A real finished run from ``multitask train`` at IMAGE_SIZE with a random-init backbone."""
    from multitask.settings import TrainConfig
    from multitask.train import train

    config = TrainConfig(out=str(out), split_file=str(split_csv), weights="none", image_size=IMAGE_SIZE,
                         cache_dir=str(cache), verbose=0, **settings)
    return train(config).path


@pytest.fixture(scope="session")
def joint_run(demo_split_csv, feature_cache, tmp_path_factory) -> Path:
    """A finished joint run at IMAGE_SIZE: the heads trained 8 epochs on demo_data's train split."""
    return shared(tmp_path_factory, "joint",
                  lambda folder: tiny_run(folder / "run", demo_split_csv, feature_cache, **JOINT_SETTINGS))


@pytest.fixture(scope="session")
def joint_predictor(joint_run):
    """joint_run's Predictor (keras engine), loaded once for the tests that only read it (the server's)."""
    from multitask.predict import Predictor

    return Predictor.from_run(joint_run)


@pytest.fixture(scope="session")
def cancer_run(demo_split_csv, feature_cache, tmp_path_factory) -> Path:
    """A finished single-task cancer run at IMAGE_SIZE, trained one epoch."""
    return shared(tmp_path_factory, "cancer",
                  lambda folder: tiny_run(folder / "run", demo_split_csv, feature_cache, task="cancer", epochs=1))


@pytest.fixture(scope="session")
def pretrained_weights() -> Path:
    """Pretrained InceptionV3 "notop" weights (see PRETRAINED_WEIGHTS); skipped where they were not built."""
    return _present(PRETRAINED_WEIGHTS, "pretrained weights (built by ../shared/tools/pretrained-weights)")


@pytest.fixture(scope="session")
def real_split_csv(real_sample, tmp_path_factory) -> Path:
    """The real sample's leakage-aware (grouped) 70/15/15 split, seed 42: what `multitask train` makes by default."""
    from multitask.data import scan
    from multitask.splits import save_split, split_manifest

    def build(folder: Path) -> Path:
        split = split_manifest(scan(real_sample), seed=42, method="grouped", cache_dir=folder / "keypoints")
        return save_split(split, folder / "split.csv")

    return shared(tmp_path_factory, "real-split", build)


@pytest.fixture(scope="session")
def real_cache(real_sample, tmp_path_factory) -> Path:
    """One feature and decoded-image cache for every real-sample run of the session."""
    return shared(tmp_path_factory, "real-cache", lambda folder: folder)


def real_training(out: Path, split_csv: Path, weights: Path, cache: Path, **settings):
    """``multitask train`` on the real sample with the pretrained backbone: the defaults unless ``settings`` says."""
    from multitask.settings import TrainConfig
    from multitask.train import train

    config = TrainConfig(out=str(out), split_file=str(split_csv), weights=str(weights), cache_dir=str(cache),
                         verbose=0, **settings)
    return train(config).path


@pytest.fixture(scope="session")
def real_run(real_split_csv, pretrained_weights, real_cache, tmp_path_factory) -> Path:
    """A joint run on the real sample with the pretrained backbone, frozen, at 160 px, otherwise the defaults: the
    session's one real run for the real, OOD, calibration, threshold and export tests."""
    return shared(tmp_path_factory, "real-run",
                  lambda folder: real_training(folder / "run", real_split_csv, pretrained_weights, real_cache,
                                               image_size=REAL_IMAGE_SIZE, fine_tune_epochs=0))


@pytest.fixture(scope="session")
def real_default_run(real_split_csv, pretrained_weights, real_cache, tmp_path_factory) -> Path:
    """The default recipe for pretrained weights (`multitask train --weights W` and nothing else) on the real sample:
    the run the README's numbers describe, and int8's fixture (int8 is promised at the default size, 299 px)."""
    return shared(tmp_path_factory, "real-default",
                  lambda folder: real_training(folder / "run", real_split_csv, pretrained_weights, real_cache))
