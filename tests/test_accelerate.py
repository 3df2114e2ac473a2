"""--precision and --jit-compile: what auto means, loss scaling, and a mixed-precision run saving a float32 model."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import IMAGE_SIZE

from multitask import cli
from multitask.accelerate import check_precision, float32_copy, make_optimizer, resolve_jit, resolve_precision
from multitask.data import load_image
from multitask.errors import ConfigError
from multitask.model import build_model, model_parts
from multitask.rundir import open_run
from multitask.settings import TrainConfig
from multitask.splits import save_split
from multitask.train import train

AMPERE, TURING = (8, 0), (7, 5)


def test_auto_precision_is_float32_on_cpu_and_bfloat16_on_gpus_that_have_it():
    assert not tf.config.list_physical_devices("GPU")  # the test machine: CPU only
    assert resolve_precision("auto") == "float32"
    assert resolve_precision("auto", gpus=[(9, 0)]) == "mixed_bfloat16"
    assert resolve_precision("auto", gpus=[AMPERE, TURING]) == "float32"  # every GPU must have it
    assert resolve_precision("mixed_float16", gpus=[]) == "mixed_float16"  # asked for: used as given


def test_auto_jit_is_off_on_cpu_and_on_where_a_gpu_is_present():
    assert resolve_jit("auto") is False
    assert resolve_jit("auto", gpus=[TURING]) is True
    assert resolve_jit("auto", gpus=[AMPERE], distributed=True) is False
    assert resolve_jit("on") is True and resolve_jit("off", gpus=[AMPERE]) is False


def test_float16_gets_loss_scaling_and_bfloat16_does_not():
    assert isinstance(make_optimizer(1e-3, precision="mixed_float16"), keras.optimizers.LossScaleOptimizer)
    assert not isinstance(make_optimizer(1e-3, precision="mixed_bfloat16"), keras.optimizers.LossScaleOptimizer)


def test_bad_values_are_refused_in_one_line(demo_split_csv, tmp_path, capsys):
    with pytest.raises(ConfigError, match="precision must be one of auto, float32"):
        TrainConfig(split_file="x.csv", precision="bf16").validate()
    with pytest.raises(ConfigError, match="decoded_cache must be one of auto, on, off"):
        TrainConfig(split_file="x.csv", decoded_cache="yes").validate()
    with pytest.raises(SystemExit):
        cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(tmp_path / "r"), "--jit-compile", "x"])
    assert "--jit-compile: invalid choice" in capsys.readouterr().err


def test_float32_copy_keeps_the_weights_and_computes_in_float32():
    keras.utils.set_random_seed(0)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = build_model(image_size=IMAGE_SIZE, weights=None)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model_parts(mixed).heads.get_layer("organ").compute_dtype == "float32"  # logits stay float32
    scaling = model_parts(mixed).backbone.get_layer("feature_scaling")
    scaling.adapt_mean.assign(np.full(scaling.adapt_mean.shape, 0.5, np.float32))
    scaling.finalize_state()
    copy = float32_copy(mixed, lambda: build_model(image_size=IMAGE_SIZE, weights=None))
    assert {layer.dtype_policy.name for layer in _layers(copy)} == {"float32"}
    for a, b in zip(mixed.weights, copy.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(np.asarray(model_parts(copy).backbone.get_layer("feature_scaling").mean), 0.5)
    assert float32_copy(copy, lambda: pytest.fail("a float32 model is not copied")) is copy


@pytest.fixture(scope="module")
def bfloat16_run(demo_split_csv, feature_cache, tmp_path_factory):
    """A tiny run in mixed_bfloat16: one heads epoch, then one fine-tuning epoch read from the decoded cache. Only
    where the CPU computes bfloat16 (AVX-512 and later; not AVX2-only CPUs, nor ``ONEDNN_MAX_CPU_ISA=AVX2``): elsewhere
    `train` refuses in one line, which the test after this one checks on every CPU."""
    try:
        check_precision("mixed_bfloat16")
    except ConfigError as exc:
        pytest.skip(f"this CPU cannot train in bfloat16 (what train says: {exc})")
    folder = tmp_path_factory.mktemp("bf16")
    split = pd.read_csv(demo_split_csv)  # a third of the images: each split's first 4 of every subclass
    small = save_split(split.groupby(["split", "subclass"]).head(4), folder / "split.csv")
    config = TrainConfig(out=str(folder / "run"), split_file=str(small), weights="none", image_size=IMAGE_SIZE,
                         cache_dir=str(feature_cache), verbose=0, epochs=1, fine_tune_epochs=1, unfreeze_from="mixed9",
                         precision="mixed_bfloat16", decoded_cache="on")
    return train(config).path


def test_mixed_bfloat16_run_is_recorded_and_saves_a_float32_model(bfloat16_run):
    info = open_run(bfloat16_run)
    assert info.config["settings"]["precision"] == "mixed_bfloat16"
    compute = info.config["compute"]
    assert compute["precision"] == "mixed_bfloat16" and compute["jit_compile"] is False  # auto: off on CPU
    assert compute["decoded_cache"]["images"] > 0 and info.config["epochs"] == {"heads": 1, "fine_tune": 1}
    # The feature pass ran in bfloat16; the saved float32 model's OOD blocks are computed again, as it computes them.
    assert info.config["ood"]["features_from"] == "a pass of its own"
    assert keras.config.dtype_policy().name == "float32"  # the global policy is back
    model = keras.models.load_model(info.model_path, safe_mode=True, compile=False)
    assert {layer.dtype_policy.name for layer in _layers(model)} == {"float32"}
    graph = tf.function(model).get_concrete_function(tf.TensorSpec((None, IMAGE_SIZE, IMAGE_SIZE, 3))).graph
    assert not [op.name for op in graph.get_operations() if "bfloat16" in str(op.node_def)]  # a float32 graph
    paths = pd.read_csv(info.path / "split.csv")["path"][:4]
    images = np.stack([np.asarray(load_image(p, IMAGE_SIZE)) for p in paths])
    logits = model.predict(images, verbose=0)
    for task in info.tasks:
        assert logits[task].dtype == np.float32 and np.isfinite(logits[task]).all()


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def test_a_machine_without_16_bit_kernels_is_refused_in_one_line_before_the_run_folder(demo_split_csv, tmp_path,
                                                                                       monkeypatch, capsys):
    """An AVX2-only CPU has no oneDNN bfloat16 or float16 convolution: TensorFlow aborts in the first training step.
    `train` probes one tiny convolution first; here the probe is made to fail as it does on such a CPU."""
    def no_16_bit_kernel(*args, **kwargs):
        raise tf.errors.AbortedError(None, None, "Operation received an exception:Status: 3, message: could not "
                                                 "create a primitive descriptor for the convolution. Run with ...")

    monkeypatch.setattr(keras.ops, "conv", no_16_bit_kernel)
    out = tmp_path / "run"
    for precision in ("mixed_bfloat16", "mixed_float16"):
        assert cli.main(["train", "--split-file", str(demo_split_csv), "--weights", "none", "--image-size",
                         str(IMAGE_SIZE), "--precision", precision, "--out", str(out)]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1
        assert f"--precision {precision}" in error and "could not create a primitive descriptor" in error
        assert "--precision float32" in error
        assert not out.exists()
    check_precision("float32")  # float32 is never probed
