"""Out-of-distribution detection: the detector on known clusters, its files, its in-graph score, and on the real
sample: generated foreign images are refused, the run's own test images mostly are not."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest
from foreign import foreign_images, kind_of
from PIL import Image

from multitask import cli
from multitask.errors import RunError
from multitask.inference import OOD_SCORE, inference_model
from multitask.model import model_parts
from multitask.ood import Computed, OodDetector, extract, feature_model, fit_run_detector
from multitask.predict import Predictor
from multitask.rundir import MARKER_FILE, open_run
from multitask.splits import load_split


def clusters(rng, n_per: int = 60, centres=None):
    """Two blocks of features from three well separated groups (around ``centres``, drawn if not given), the
    group of each row, and the centres."""
    centres = centres or {"a": rng.normal(0, 10, (3, 6)), "b": rng.normal(0, 10, (3, 4))}
    groups = np.repeat(np.arange(3), n_per)
    features = {name: c[groups] + rng.normal(0, 1, (len(groups), c.shape[1])) for name, c in centres.items()}
    return features, groups, centres


def test_detector_flags_points_far_from_every_cluster():
    rng = np.random.default_rng(0)
    features, groups, centres = clusters(rng)
    detector, held_out = OodDetector.fit(features, groups=groups, seed=0)
    threshold = np.percentile(held_out, 99)
    new, _, _ = clusters(np.random.default_rng(1), centres=centres)  # fresh draws from the same clusters
    assert np.mean(detector.score(new) > threshold) <= 0.05
    # between the clusters, or far out in one block only: both unlike anything seen
    between = {name: c[:2].mean(0, keepdims=True).repeat(5, 0) for name, c in centres.items()}
    one_block = {name: centres[name][[0] * 5] + (30 if name == "b" else 0) for name in centres}
    assert (detector.score(between) > threshold).all() and (detector.score(one_block) > threshold).all()
    # held-out scores are standardised: centred near 0 per block, so the sum of two is small for the fitted data
    assert abs(np.median(held_out)) < 1.0


def test_detector_round_trips_through_its_files(tmp_path):
    features, groups, _ = clusters(np.random.default_rng(2))
    detector, _ = OodDetector.fit(features, groups=groups)
    detector.threshold = 3.5
    detector.to_json(tmp_path / "ood.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ood.json", "ood.npz"]
    loaded = OodDetector.from_json(tmp_path / "ood.json")
    assert loaded.threshold == 3.5 and loaded.block_names == detector.block_names
    np.testing.assert_allclose(loaded.score(features), detector.score(features), rtol=1e-5, atol=1e-5)
    (tmp_path / "ood.npz").write_bytes(b"not an npz")
    with pytest.raises(RunError, match="ood.json.*not a readable OOD detector"):
        OodDetector.from_json(tmp_path / "ood.json")


def test_train_fits_a_detector_that_the_graph_computes_exactly(joint_run, demo_split_csv, tmp_path):
    info = open_run(joint_run)
    assert {"ood.json", "ood.npz"} <= set(json.loads((joint_run / MARKER_FILE).read_text())["files"])  # owned
    record = info.config["ood"]
    assert record["layers"] == ["inception_scaling", "mixed0", "mixed2", "mixed5"]
    split = load_split(demo_split_csv)
    assert record["fit_images"] == (split["split"] == "train").sum() and record["threshold_source"] == "val"
    # A frozen run fits it on block features from its feature pass: the same detector as a pass of its own gives.
    assert record["features_from"] == "the training feature pass"
    backbone = model_parts(info.load_model()).backbone
    own = fit_run_detector(backbone, split, image_size=info.image_size, batch_size=16, seed=info.config["seed"],
                           out=tmp_path / "ood.json")
    assert own["features_from"] == "a pass of its own" and own["fit_images"] == record["fit_images"]
    assert own["threshold"] == pytest.approx(record["threshold"], rel=1e-4)
    detector = info.load_ood()
    assert detector.threshold == pytest.approx(record["threshold"])
    # the numpy score of the training features equals the inference graph's ood_score on the same images
    model = info.load_model()
    files = split[split["split"] == "test"]["path"].head(6).tolist()
    features, rows = extract(feature_model(model_parts(model).backbone), files, image_size=info.image_size,
                             batch_size=8)
    from multitask.export import load_images

    graph = inference_model(model, temperatures=info.temperatures, ood=detector)
    in_graph = np.asarray(graph(load_images(files, info.image_size))[OOD_SCORE])
    assert in_graph.shape == (len(files),)
    np.testing.assert_allclose(in_graph[rows], detector.score(features), rtol=1e-3, atol=1e-3)
    # the graph's custom layers are registered: it saves and loads under safe_mode=True
    assert {type(layer).__name__ for layer in graph.layers} >= {"OodScore", "PixelStatistics"}
    config = keras.saving.serialize_keras_object(graph)
    rebuilt = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert rebuilt.get_layer("ood_score").get_config()["dims"] == [3, 256, 288, 768]


def test_computed_block_features_answer_as_a_pass_would_or_not_at_all():
    blocks = {name: np.arange(6, dtype=np.float32).reshape(3, 2) + i
              for i, name in enumerate(("pixels", "mixed0", "mixed2", "mixed5"))}
    computed = Computed(["a", "b", "c", "d"], blocks, np.array([0, 2, 3]), ("sha", "float32"))  # "b" did not decode
    features, rows = computed.lookup(["d", "b", "a"])
    assert rows.tolist() == [0, 2]  # positions in the asked paths, as extract() gives: "b" is skipped
    np.testing.assert_array_equal(features["mixed0"], [[5.0, 6.0], [1.0, 2.0]])  # rows of "d" and "a"
    assert features["mixed0"].dtype == np.float64
    assert computed.lookup(["a", "e"]) is None  # a path the pass never saw: the caller makes its own pass
    missing = Computed(["a"], {"pixels": blocks["pixels"][:1]}, np.array([0]), ("sha", "float32"))
    assert missing.lookup(["a"]) is None  # blocks missing


@pytest.fixture(scope="module")
def foreign_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("foreign")
    for name, image in foreign_images(per_kind=4).items():
        Image.fromarray(image).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def real_predictions(real_run, real_split_csv, foreign_folder):
    predictor = Predictor.from_run(real_run)
    split = load_split(real_split_csv)
    test = predictor.predict_files(split[split["split"] == "test"]["path"].tolist(), progress=False)
    return test, predictor.predict([foreign_folder], progress=False)


def test_real_run_refuses_foreign_images_and_keeps_its_own(real_predictions):
    test, foreign = real_predictions
    kinds = foreign["path"].map(lambda p: kind_of(p.rsplit("/", 1)[-1].removesuffix(".png")))
    flagged = foreign.groupby(kinds)["ood"].mean()
    assert foreign["ood"].mean() >= 0.9, flagged.to_dict()
    assert (flagged >= 0.5).all(), flagged.to_dict()  # no kind gets through wholesale
    assert test["ood"].mean() <= 0.05, test["ood_score"].describe()
    assert foreign["ood_score"].median() > test["ood_score"].max()


def test_reject_ood_withholds_the_answers_with_a_note(real_run, foreign_folder, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(real_run), str(foreign_folder / "noise_0.png"), str(foreign_folder / "chart_1.png"),
                     "--reject-ood", "--out", str(out)]) == 0
    frame = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert frame["ood"].all() and frame["organ"].isna().all() and frame["cancer"].isna().all()
    assert frame["note"].str.contains("unlike the training images").all()
    assert frame["note"].str.contains("withheld").all()
    assert "2 unlike the training images (ood)" in capsys.readouterr().out
