"""Training: `multitask train`, the feature cache, resuming (on two mirrored CPUs), fine-tuning, and errors."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import IMAGE_SIZE

from multitask import cli
from multitask import features as features_module
from multitask.data import class_weights, load_image, sample_weights, scan
from multitask.errors import ConfigError, ModelError, RunError
from multitask.features import cached_features, extract_features
from multitask.rundir import (
    CONFIG_FILE,
    HISTORY_FILE,
    HISTORY_PLOT,
    MARKER_FILE,
    MODEL_FILE,
    SPLIT_FILE,
    STATE_DIR,
    open_run,
)
from multitask.settings import TrainConfig
from multitask.splits import load_split, split_manifest
from multitask.synthetic import plant_bad_files
from multitask.taxonomy import load_taxonomy
from multitask.train import train


class Interrupted(RuntimeError):
    """Stands in for Ctrl-C or a killed process (pytest treats a real KeyboardInterrupt as 'stop everything')."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def cli_joint_run(demo_data, cache_dir, tmp_path_factory):
    """One joint run through the CLI, in-process: a new random split, uncertainty weighting, balanced classes."""
    out = tmp_path_factory.mktemp("runs") / "joint"
    rc = cli.main([
        "train", "--data", str(demo_data), "--split", "random", "--out", str(out), "--weights", "none",
        "--image-size", str(IMAGE_SIZE), "--epochs", "3", "--learning-rate", "0.01", "--weighting", "uncertainty",
        "--balance", "--cache-dir", str(cache_dir),
    ])
    return rc, out


def small_config(tmp_path, split_file, **changes) -> TrainConfig:
    settings = dict(out=str(tmp_path / "run"), split_file=str(split_file), weights="none", image_size=IMAGE_SIZE,
                    epochs=1, verbose=0)
    return TrainConfig(**{**settings, **changes})


# ----------------------------------------------------------------------------------------------- the joint run


def test_cli_train_writes_a_complete_run(cli_joint_run, demo_data):
    rc, out = cli_joint_run
    assert rc == 0
    for name in (MODEL_FILE, CONFIG_FILE, SPLIT_FILE, HISTORY_FILE, HISTORY_PLOT):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not (out / STATE_DIR).exists()
    info = open_run(out)
    config = info.config
    assert info.task == "joint" and info.tasks == ("organ", "cancer") and info.image_size == IMAGE_SIZE
    assert info.labels["organ"][0] == "Blood" and info.labels["cancer"] == ["Benign", "Malignant"]
    assert set(config["timings"]) == {"features", "heads", "fine_tune"}
    assert config["epochs"] == {"heads": 3, "fine_tune": 0} and config["seed"] == 42
    assert config["versions"]["keras"] == keras.__version__
    settings = TrainConfig.from_dict(config["settings"])
    assert settings.weighting == "uncertainty" and settings.balance and settings.learning_rate == 0.01
    assert settings.to_dict() == config["settings"]
    expected = split_manifest(scan(demo_data), seed=42, method="random")  # what --data --split random makes
    saved = load_split(out / SPLIT_FILE)
    pd.testing.assert_frame_equal(saved[["path", "split"]], expected[["path", "split"]])


def test_history_logs_each_head_and_the_learned_weights(cli_joint_run):
    _, out = cli_joint_run
    history = pd.read_csv(out / HISTORY_FILE)
    assert history["epoch"].tolist() == [1, 2, 3]  # counted from 1, as config.json, the CLI and history.png count
    metrics = ["loss", "organ_loss", "cancer_loss", "organ_accuracy", "cancer_accuracy"]
    assert {*metrics, *(f"val_{m}" for m in metrics)} <= set(history.columns)
    assert {"organ_log_var", "cancer_log_var", "organ_weight", "cancer_weight"} <= set(history.columns)
    learned = json.loads((out / CONFIG_FILE).read_text())["weighting"]
    assert learned["method"] == "uncertainty" and "exp(-s_t)" in learned["formula"]
    # the learned log-variances moved, were logged every epoch, and the saved values are the final ones
    assert history["organ_log_var"].iloc[0] != pytest.approx(history["organ_log_var"].iloc[-1])
    assert abs(learned["log_vars"]["organ"]) > 1e-3
    assert learned["log_vars"]["organ"] == pytest.approx(history["organ_log_var"].iloc[-1])
    assert learned["loss_weights"]["cancer"] == pytest.approx(np.exp(-learned["log_vars"]["cancer"]))


def test_epochs_are_counted_from_1_in_config_history_and_the_cli(demo_split_csv, cache_dir, tmp_path, capsys):
    """Issue 20: config.json said saved.epoch 37, history.csv counted from 0, the CLI printed "heads epoch 38" and
    history.png counted from 1. Now all four use the same 1-based number."""
    out = tmp_path / "run"
    assert cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), "--weights", "none",
                     "--image-size", str(IMAGE_SIZE), "--epochs", "3", "--learning-rate", "0.01",
                     "--cache-dir", str(cache_dir)]) == 0
    config = json.loads((out / CONFIG_FILE).read_text())
    history = pd.read_csv(out / HISTORY_FILE)
    assert history["epoch"].tolist() == [1, 2, 3]
    monitor = config["best"]["monitor"]
    best = int(history.loc[history[monitor].idxmin(), "epoch"])
    assert config["saved"] == {"phase": "heads", "epoch": best} and config["final"]["epoch"] == best
    assert config["best"]["heads"] == pytest.approx(history[monitor].min())
    assert f"(the saved model: heads epoch {best})" in capsys.readouterr().out


def test_saved_model_loads_safely_and_matches_the_cached_features(cli_joint_run):
    """model.keras must hold the very backbone whose features the heads were trained on."""
    _, out = cli_joint_run
    config = json.loads((out / CONFIG_FILE).read_text())
    model = keras.models.load_model(out / MODEL_FILE, safe_mode=True, compile=False)
    split = load_split(out / SPLIT_FILE)
    fit_rows = pd.concat([split[split["split"] == s] for s in ("train", "val")]).reset_index(drop=True)
    with np.load(config["features"]["cache"]) as cache:
        cached, rows = cache["values"][:4], cache["rows"][:4]
    images = np.stack([np.asarray(load_image(fit_rows["path"][i], IMAGE_SIZE)) for i in rows])
    backbone = model.get_layer("backbone")
    scaling = backbone.get_layer("feature_scaling")  # the cache holds raw features; the model standardises them
    assert np.abs(np.asarray(scaling.mean)).max() > 0 and not np.allclose(np.asarray(scaling.variance), 1)
    np.testing.assert_allclose(np.asarray(backbone(images)), np.asarray(scaling(cached)), rtol=1e-3, atol=2e-3)
    logits = model(images)
    assert set(logits) == {"organ", "cancer"} and logits["organ"].shape == (4, 9)


def test_balanced_weights_make_every_class_count_equally(cli_joint_run):
    train_rows = pd.DataFrame({"organ_id": [0, 0, 0, 1], "cancer_id": [1, 1, 0, 0]})
    weights = class_weights(train_rows, ("organ", "cancer"))
    per_row = sample_weights(train_rows, weights)
    organ = per_row["organ"]
    assert organ[:3].sum() == pytest.approx(organ[3:].sum())  # class 0 (3 rows) weighs as much as class 1 (1 row)
    assert per_row["cancer"].tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])
    unseen = sample_weights(pd.DataFrame({"organ_id": [7], "cancer_id": [0]}), weights)
    assert unseen["organ"].tolist() == [1.0]
    _, out = cli_joint_run
    saved = json.loads((out / CONFIG_FILE).read_text())["class_weights"]
    assert set(saved) == {"organ", "cancer"} and len(saved["organ"]) == 9


# ----------------------------------------------------------------------------------------------- cache and resume


def test_single_task_run_reuses_cached_features(cli_joint_run, demo_data, cache_dir, tmp_path, caplog,
                                                monkeypatch):
    cache_files = {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()}

    def no_backbone_pass(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(features_module, "extract_outputs", no_backbone_pass)  # every feature pass goes through it
    caplog.set_level(logging.INFO, logger="multitask")
    config = TrainConfig(out=str(tmp_path / "organ"), data=str(demo_data), split="random", task="organ",
                         weights="none", image_size=IMAGE_SIZE, epochs=2, cache_dir=str(cache_dir), verbose=0)
    info = train(config)
    assert "reusing cached features" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in cache_dir.iterdir()} == cache_files
    assert info.tasks == ("organ",) and info.config["features"]["reused"]
    logits = info.load_model()(np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), "float32"))
    assert list(logits) == ["organ"] and logits["organ"].shape == (2, 9)


def test_interrupted_run_on_two_mirrored_cpus_resumes_at_the_next_epoch(demo_split_csv, cache_dir, tmp_path, caplog):
    class InterruptAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise Interrupted("killed")

    class RecordEpochs(keras.callbacks.Callback):
        begun: list[int] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.begun.append(epoch)

    caplog.set_level(logging.INFO, logger="multitask")
    before = set(cache_dir.iterdir())
    # another image size: the cached 75 px features must not be used
    config = small_config(tmp_path, demo_split_csv, task="cancer", image_size=80, epochs=3, cache_dir=str(cache_dir),
                          strategy="mirrored")
    with pytest.raises(Interrupted):
        train(config, callbacks=[InterruptAfterFirstEpoch()])
    assert "computing backbone features" in caplog.text and len(set(cache_dir.glob("features-*")) - before) == 1
    assert pd.read_csv(tmp_path / "run" / HISTORY_FILE)["epoch"].tolist() == [1]
    with pytest.raises(RunError, match="not a finished run"):
        open_run(tmp_path / "run")

    recorder = RecordEpochs()
    info = train(config, callbacks=[recorder])
    assert recorder.begun == [1, 2]  # Keras' own indices: the 2nd and 3rd epochs
    assert pd.read_csv(info.path / HISTORY_FILE)["epoch"].tolist() == [1, 2, 3]
    assert info.config["epochs"]["heads"] == 3 and info.config["features"]["reused"]
    # --split-file: the run uses (and keeps) exactly that split
    saved, given = load_split(info.split_path), load_split(demo_split_csv)
    pd.testing.assert_frame_equal(saved[["path", "split"]], given[["path", "split"]])


# ----------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture()
def small_split_with_bad_files(demo_split_csv, tmp_path):
    """Two training and one validation image per subclass, plus undecodable files in the training split."""
    split = pd.read_csv(demo_split_csv)
    small = pd.concat([split[split["split"] == "train"].groupby("subclass").head(2),
                       split[split["split"] == "val"].groupby("subclass").head(1)])
    bad = plant_bad_files(tmp_path / "bad", taxonomy=load_taxonomy(), size=96)
    extra = pd.DataFrame({"path": [str(bad["empty"]), str(bad["text"])], "subclass": small["subclass"].iloc[0],
                          "split": "train"})
    path = tmp_path / "small.csv"
    pd.concat([small, extra])[["path", "subclass", "split"]].to_csv(path, index=False)
    return path, [str(bad["empty"]), str(bad["text"])]


def test_fine_tuning_trains_the_top_block_only_and_skips_bad_files(small_split_with_bad_files, tmp_path, caplog):
    from multitask.model import build_backbone

    split_file, bad_paths = small_split_with_bad_files
    config = small_config(tmp_path, split_file, fine_tune_epochs=1, unfreeze_from="mixed9", batch_size=13,
                          fine_tune_schedule="cosine")
    with caplog.at_level(logging.INFO, logger="multitask.train"):
        info = train(config)
    assert info.config["epochs"] == {"heads": 1, "fine_tune": 1}
    assert info.config["settings"]["fine_tune_schedule"] == "cosine"
    assert pd.read_csv(info.path / HISTORY_FILE)["epoch"].tolist() == [1, 2]
    assert sorted(info.config["features"]["skipped"]) == sorted(bad_paths)
    # The cosine decays over the phase's steps: one per batch of the training images that decode (52 = 4 x 13; with
    # the 2 bad files it would be 5).
    split = pd.read_csv(info.path / "split.csv")
    readable = int(((split["split"] == "train") & ~split["path"].isin(bad_paths)).sum())
    assert readable == 52 and "cosine-decayed to 0 over 4 steps" in caplog.text
    # Fine-tuning from mixed9 leaves the OOD detector's layers (up to mixed5) as phase 1's pass computed them.
    assert info.config["ood"]["features_from"] == "the training feature pass"

    keras.utils.set_random_seed(config.seed)  # the same initialisation the run started from
    initial = build_backbone(IMAGE_SIZE, weights=None)
    tuned = info.load_model().get_layer("backbone")
    start = [layer.name for layer in initial.layers].index("mixed9")
    changed = []
    for i, (before, after) in enumerate(zip(initial.layers, tuned.layers, strict=True)):
        for old, new in zip(before.weights, after.weights, strict=True):
            same = np.array_equal(np.asarray(old), np.asarray(new))
            if i < start or isinstance(before, keras.layers.BatchNormalization):
                assert same, f"{before.name} should be frozen"
            elif not same:
                changed.append(before.name)
    assert changed, "no layer above mixed9 was fine-tuned"


def test_augmenter_changes_images_within_range():
    from multitask.augment import make_augmenter

    images = np.random.default_rng(0).uniform(0, 255, (4, IMAGE_SIZE, IMAGE_SIZE, 3)).astype("float32")
    augmented = np.asarray(make_augmenter(seed=1)(images))
    assert augmented.shape == images.shape and augmented.dtype == np.float32
    assert augmented.min() >= 0 and augmented.max() <= 255
    assert not np.allclose(augmented, images)


def test_the_same_seed_augments_the_same_batches(demo_split_csv):
    """Fine-tuning's augmented batches are a function of the seed, so a seed gives the same model. keras-cv draws
    from a seeded generator; a parallel tf.data map took its draws in thread order, and two identical fine-tuning
    runs ended apart (validation loss 1.40 against 1.22; this test's pipeline differed in 4 of 4 tries).
    On a CPU the map runs one batch at a time (multitask.augment.augment_calls)."""
    from multitask.accelerate import gpu_capabilities
    from multitask.augment import augment_calls, make_augmenter
    from multitask.data import make_dataset

    if gpu_capabilities():
        pytest.skip("with a GPU the augmentation map runs in parallel, for throughput")
    assert augment_calls() is None
    rows = pd.read_csv(demo_split_csv).head(48)

    def epoch():
        keras.utils.set_random_seed(3)  # as Trainer does
        batches = make_dataset(rows, image_size=IMAGE_SIZE, batch_size=2, training=True, seed=3,
                               augment=make_augmenter(seed=3))
        return np.concatenate([np.asarray(images) for images, _ in batches])

    first, second = epoch(), epoch()
    assert first.shape == (48, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(first, second)


# ----------------------------------------------------------------------------------------------- the feature cache


def tiny_backbone(seed: int = 0):
    """Stands in for InceptionV3: pooled colours through a dense layer, so weights and size matter."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((None, None, 3))
    return keras.Model(image, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(image)))


def test_extract_features_skips_undecodable_files_and_keeps_order(demo_data, tmp_path, caplog):
    good = sorted(str(p) for p in demo_data.rglob("*.jpg"))[:3]
    bad = plant_bad_files(tmp_path, taxonomy=load_taxonomy(), size=96)
    paths = [good[0], str(bad["text"]), good[1], str(bad["empty"]), good[2]]
    backbone = tiny_backbone()
    values, rows = extract_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=2, verbose=0)
    assert rows.tolist() == [0, 2, 4]
    expected = backbone.predict(np.stack([np.asarray(load_image(p, IMAGE_SIZE)) for p in good]), verbose=0)
    np.testing.assert_allclose(values, expected, rtol=1e-5)
    assert str(bad["text"]) in caplog.text and str(bad["empty"]) in caplog.text


def test_feature_cache_is_keyed_by_weights_size_and_files(demo_data, tmp_path):
    paths = sorted(str(p) for p in demo_data.rglob("*.jpg"))[:4]
    backbone = tiny_backbone(seed=0)

    def features(model=backbone, size=IMAGE_SIZE):
        return cached_features(model, paths, image_size=size, batch_size=4, cache_dir=tmp_path, verbose=0)

    first = features()
    assert not first.reused and first.path.is_file()
    mtime = first.path.stat().st_mtime_ns
    again = features()
    assert again.reused and again.path == first.path and first.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.values, first.values)
    assert not features(size=80).reused
    assert not features(model=tiny_backbone(seed=1)).reused
    os.utime(paths[0], ns=(mtime, os.stat(paths[0]).st_mtime_ns + 10**9))  # an edited file
    assert not features().reused
    assert len(list(tmp_path.glob("features-*.npz"))) == 4


# ----------------------------------------------------------------------------------------------- errors


def test_missing_weights_file_fails_before_any_work(demo_split_csv, tmp_path):
    config = small_config(tmp_path, demo_split_csv, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ModelError, match="missing.h5 does not exist.*weights=none"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_cli_prints_library_errors_and_exits_2(demo_split_csv, tmp_path, capsys):
    rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(tmp_path / "run"),
                   "--weights", str(tmp_path / "missing.h5")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "multitask train: error: weights file" in err and "pass --weights=imagenet" in err  # flags, not names


@pytest.mark.parametrize(("value", "message"), [
    ("organ=-1", "loss weight of organ must be a finite number >= 0"),
    ("liver=1", "unknown task 'liver'"),
    ("organ=x", "loss weight of organ must be a number"),
])
def test_cli_rejects_bad_loss_weights(value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--loss-weights", value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "liver"}, "task must be one of joint, organ, cancer"),
    ({"loss_weights": {"organ": "heavy"}}, "loss weight of organ must be a number"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"image_size": 64}, "below InceptionV3's minimum"),
    ({"split_file": None}, "give the dataset folder"),
    ({"strategy": "tpu"}, "strategy must be one of"),
])
def test_bad_settings_are_config_errors(changes, message, demo_split_csv, tmp_path):
    with pytest.raises(ConfigError, match=message):
        dataclasses.replace(small_config(tmp_path, demo_split_csv), **changes).validate()


def test_finished_run_is_not_overwritten_by_accident(cli_joint_run, demo_split_csv):
    _, out = cli_joint_run
    config = TrainConfig(out=str(out), split_file=str(demo_split_csv), weights="none", image_size=IMAGE_SIZE,
                         verbose=0)
    with pytest.raises(ConfigError, match="already holds a finished run.*pass overwrite"):
        train(config)
    assert open_run(out).config["status"] == "complete"


def test_unfinished_run_with_other_settings_is_not_resumed(demo_split_csv, tmp_path):
    config = small_config(tmp_path, demo_split_csv, epochs=2)
    state = tmp_path / "run" / STATE_DIR
    state.mkdir(parents=True)
    (state / "settings.json").write_text(json.dumps({**config.to_dict(), "epochs": 5}))
    (tmp_path / "run" / MARKER_FILE).write_text(json.dumps({"format": 1, "files": []}))
    with pytest.raises(ConfigError, match=r"unfinished run with other settings \(epochs: 5 -> 2\)"):
        train(config)


# ----------------------------------------------------------------------------------------------- divergence


def test_a_diverging_run_stops_with_a_clear_error_and_is_never_finished(demo_split_csv, feature_cache, tmp_path,
                                                                        capsys):
    out = tmp_path / "nan"
    rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), "--weights", "none",
                   "--image-size", str(IMAGE_SIZE), "--epochs", "3", "--learning-rate", "1e38",
                   "--cache-dir", str(feature_cache)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "training diverged: the loss became" in err[0] and "Lower --learning-rate" in err[0]
    assert not (out / CONFIG_FILE).exists() and not (out / MODEL_FILE).exists()
    with pytest.raises(RunError, match="not a finished run"):
        open_run(out)


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--learning-rate", "inf", "--learning-rate must be a positive number, got inf"),
    ("--fine-tune-learning-rate", "0", "--fine-tune-learning-rate must be a positive number, got 0.0"),
])
def test_impossible_learning_rates_are_refused_before_any_work(flag, value, message, demo_split_csv, tmp_path,
                                                                capsys):
    out = tmp_path / "run"
    rc = cli.main(["train", "--split-file", str(demo_split_csv), "--out", str(out), flag, value])
    assert rc == 2 and message in capsys.readouterr().err
    assert not out.exists()
