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
IMAGE_SIZE = 75  # InceptionV3's minimum: the cheapest size that exercises the real architecture


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """A synthetic dataset in the Kaggle layout: 26 subclasses x 12 images of 96 px (no bad files)."""
    from multitask.synthetic import generate

    return generate(tmp_path_factory.mktemp("demo"), per_class=12, size=96, seed=0)


@pytest.fixture(scope="session")
def demo_split_csv(demo_data, tmp_path_factory) -> Path:
    """A saved 70/15/15 split manifest of ``demo_data`` (seed 42)."""
    from multitask.data import save_split, scan, split_manifest

    path = tmp_path_factory.mktemp("split") / "split.csv"
    save_split(split_manifest(scan(demo_data), seed=42), path)
    return path


@pytest.fixture(scope="session")
def real_sample() -> Path:
    """The ~240 real images shipped beside the repo for developers; skipped in users' clones."""
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"{REAL_SAMPLE} not present")
    return REAL_SAMPLE


@pytest.fixture(scope="session")
def joint_run(demo_split_csv, tmp_path_factory) -> Path:
    """A finished joint run at IMAGE_SIZE trained 4 epochs on demo_data's train split (tests/helpers.make_run)."""
    from helpers import make_run

    return make_run(tmp_path_factory.mktemp("joint_run"), split_csv=demo_split_csv, task="joint",
                    image_size=IMAGE_SIZE, epochs=4)


@pytest.fixture(scope="session")
def cancer_run(demo_split_csv, tmp_path_factory) -> Path:
    """A finished, untrained single-task cancer run at IMAGE_SIZE (tests/helpers.make_run)."""
    from helpers import make_run

    return make_run(tmp_path_factory.mktemp("cancer_run"), split_csv=demo_split_csv, task="cancer",
                    image_size=IMAGE_SIZE)
