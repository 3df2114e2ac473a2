"""Shared fixtures: one tiny synthetic dataset and split per test session, reused by every module."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def _present(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not present: {path}")
    return path


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A synthetic dataset in the Kaggle layout: 26 subclasses x 12 images of 96 px (no bad files)."""
    from multitask.synthetic import generate

    return generate(tmp_path_factory.mktemp("demo"), per_class=12, size=96, seed=0)


@pytest.fixture(scope="session")
def demo_split_csv(demo_data, tmp_path_factory) -> Path:
    """A saved 70/15/15 split manifest of ``demo_data`` (seed 42)."""
    from multitask.data import scan
    from multitask.splits import save_split, split_manifest

    path = tmp_path_factory.mktemp("split") / "split.csv"
    save_split(split_manifest(scan(demo_data), seed=42), path)
    return path


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The 818 real images of all 9 organs beside the developers' checkout; skipped in users' clones."""
    return _present(REAL_SAMPLE, "the shared real sample")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    """One feature cache for the session's runs (same seed, same random backbone: its features are reused)."""
    return tmp_path_factory.mktemp("feature-cache")


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
    return tiny_run(tmp_path_factory.mktemp("joint") / "run", demo_split_csv, feature_cache, **JOINT_SETTINGS)


@pytest.fixture(scope="session")
def joint_predictor(joint_run):
    """joint_run's Predictor (keras engine), loaded once for the tests that only read it (the server's)."""
    from multitask.predict import Predictor

    return Predictor.from_run(joint_run)


@pytest.fixture(scope="session")
def cancer_run(demo_split_csv, feature_cache, tmp_path_factory) -> Path:
    """A finished single-task cancer run at IMAGE_SIZE, trained one epoch."""
    return tiny_run(tmp_path_factory.mktemp("cancer") / "run", demo_split_csv, feature_cache, task="cancer",
                    epochs=1)


@pytest.fixture(scope="session")
def pretrained_weights() -> Path:
    """Pretrained InceptionV3 "notop" weights (see PRETRAINED_WEIGHTS); skipped where they were not built."""
    return _present(PRETRAINED_WEIGHTS, "pretrained weights (built by ../shared/tools/pretrained-weights)")


@pytest.fixture(scope="session")
def real_split_csv(real_sample, tmp_path_factory) -> Path:
    """The real sample's leakage-aware (grouped) 70/15/15 split, seed 42: what `multitask train` makes by default."""
    from multitask.data import scan
    from multitask.splits import save_split, split_manifest

    out = tmp_path_factory.mktemp("real-split")
    split = split_manifest(scan(real_sample), seed=42, method="grouped", cache_dir=out / "keypoints")
    return save_split(split, out / "split.csv")


@pytest.fixture(scope="session")
def real_cache(real_sample, tmp_path_factory) -> Path:
    """One feature and decoded-image cache for every real-sample run of the session."""
    return tmp_path_factory.mktemp("real-cache")


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
    return real_training(tmp_path_factory.mktemp("real-run") / "run", real_split_csv, pretrained_weights,
                         real_cache, image_size=REAL_IMAGE_SIZE, fine_tune_epochs=0)


@pytest.fixture(scope="session")
def real_default_run(real_split_csv, pretrained_weights, real_cache, tmp_path_factory) -> Path:
    """The default recipe for pretrained weights (`multitask train --weights W` and nothing else) on the real sample:
    the run the README's numbers describe, and int8's fixture (int8 is promised at the default size, 256 px)."""
    return real_training(tmp_path_factory.mktemp("real-default") / "run", real_split_csv, pretrained_weights,
                         real_cache)
