"""Grad-CAM per head: shapes, range, and that a trained head looks where its evidence is."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from multitask import model as mt_model
from multitask.errors import DataError
from multitask.explain import GradCam, save_overlay, upsample

SIZE = 192  # InceptionV3's mixed10 is 4x4 here: 2x2 cells per image quadrant


def quadrant_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Grey noise; class 1 carries a bright 60 px patch inside the top-left quadrant, class 0 does not."""
    images = rng.normal(110, 20, (n, SIZE, SIZE, 3)).clip(0, 255).astype(np.float32)
    labels = np.arange(n) % 2
    half = SIZE // 2
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, half - 60, 2)
        images[i, y : y + 60, x : x + 60] = rng.uniform(200, 255, (60, 60, 3))
    return images, labels


@pytest.fixture(scope="module")
def trained_joint():
    """Joint model whose cancer head learned 'patch in the top-left quadrant' (frozen backbone, heads only)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images, labels = quadrant_images(160, rng)
    backbone = mt_model.build_backbone(SIZE, weights=None)
    heads = mt_model.build_heads()
    features = backbone.predict(images, batch_size=32, verbose=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    heads.compile(optimizer=keras.optimizers.Adam(1e-3), loss={"organ": loss, "cancer": loss},
                  metrics={"cancer": ["accuracy"]})
    heads.fit(features, {"organ": labels, "cancer": labels}, epochs=30, batch_size=32, verbose=0)
    return mt_model.assemble(backbone, heads), rng


def test_heatmaps_have_feature_map_shape_and_unit_range(trained_joint):
    net, rng = trained_joint
    images, _ = quadrant_images(6, rng)
    cams, predicted = GradCam(net)(images)
    assert set(cams) == {"organ", "cancer"}
    for cam in cams.values():
        assert cam.shape == (6, 4, 4) and cam.dtype == np.float32
        peaks = cam.max(axis=(1, 2))  # 1, or 0 where no region speaks for the predicted class
        assert cam.min() >= 0.0 and np.all(np.isclose(peaks, 1.0) | np.isclose(peaks, 0.0))
        assert np.isclose(peaks, 1.0).any()
    assert predicted["organ"].shape == (6,)


def test_a_chosen_class_is_explained_instead_of_the_argmax(trained_joint):
    """The cancer answer follows the run's threshold, so Grad-CAM must be able to explain the class decided on."""
    net, rng = trained_joint
    images, _ = quadrant_images(20, rng)
    gradcam = GradCam(net)
    cams, predicted = gradcam(images)
    other = 1 - predicted["cancer"]
    chosen = np.where(np.arange(20) % 2 == 0, other, -1)  # the other class on even rows, the predicted one on odd
    cams_chosen, explained = gradcam(images, {"cancer": chosen})
    assert np.array_equal(explained["cancer"], np.where(chosen >= 0, other, predicted["cancer"]))
    assert np.array_equal(explained["organ"], predicted["organ"])  # heads left out: their predicted class
    np.testing.assert_allclose(cams_chosen["cancer"][1::2], cams["cancer"][1::2], atol=1e-5)
    assert not np.allclose(cams_chosen["cancer"][0::2], cams["cancer"][0::2], atol=1e-3)


def test_cancer_heatmap_peaks_in_the_quadrant_holding_the_evidence(trained_joint):
    net, rng = trained_joint
    images, labels = quadrant_images(20, rng)
    cams, predicted = GradCam(net)(images)
    positives = (labels == 1) & (predicted["cancer"] == 1)
    assert positives.sum() >= 8  # the head learned the task
    for cam in cams["cancer"][positives]:
        row, col = np.unravel_index(np.argmax(cam), cam.shape)
        assert row < 2 and col < 2, cam.round(2)
        assert cam[:2, :2].mean() > cam[2:, 2:].mean()


@pytest.mark.parametrize(("size", "layer", "side"), [(75, "mixed7", 3), (128, "mixed7", 6), (160, "mixed10", 3)])
def test_the_last_block_with_a_map_of_at_least_3x3_is_explained(size, layer, side):
    gradcam = GradCam(mt_model.build_single_task_model("cancer", size, weights=None))
    cams, _ = gradcam(np.zeros((1, size, size, 3), np.float32))
    assert gradcam.layer == layer and cams["cancer"].shape == (1, side, side)


def test_single_task_model_gets_one_heatmap():
    net = mt_model.build_single_task_model("organ", SIZE, weights=None)
    cams, _ = GradCam(net)(np.zeros((1, SIZE, SIZE, 3), np.float32))
    assert list(cams) == ["organ"]


def test_overlay_png_is_written(tmp_path, trained_joint):
    net, rng = trained_joint
    images, _ = quadrant_images(1, rng)
    cams, _ = GradCam(net)(images)
    path = save_overlay(images[0], {t: c[0] for t, c in cams.items()}, {"organ": "organ"}, tmp_path / "x.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert upsample(cams["cancer"][0], SIZE).shape == (SIZE, SIZE)


# ----------------------------------------------------------------------------------------------- integration


def test_predictor_explain_returns_a_2d_unit_heatmap(joint_run, demo_split_csv):
    from multitask.predict import Predictor

    predictor = Predictor.from_run(joint_run)
    path = pd.read_csv(demo_split_csv)["path"].iloc[0]
    for head in ("organ", "cancer"):
        cam = predictor.explain(path, head=head)
        assert cam.ndim == 2 and cam.min() >= 0.0 and cam.max() <= 1.0
    with pytest.raises(DataError, match="cannot explain"):
        predictor.explain(demo_split_csv, head="organ")  # a CSV is not an image


def test_predict_cli_writes_one_overlay_per_image_and_head(joint_run, demo_data, tmp_path):
    from multitask import cli

    folder = next((demo_data / "Multi Cancer" / "Multi Cancer" / "Oral Cancer").iterdir())
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(joint_run), str(folder), "--explain", str(tmp_path / "cams"),
                     "--out", str(out)]) == 0
    frame = pd.read_csv(out)
    assert len(frame) == 12
    for task in ("organ", "cancer"):
        files = frame[f"explain_{task}"]
        assert files.notna().all() and all(f.endswith(f"_{task}.png") for f in files)
        assert all(Path(f).read_bytes()[:4] == b"\x89PNG" for f in files)


def test_single_task_run_explains_its_head_only(cancer_run, demo_split_csv):
    from multitask.predict import Predictor

    predictor = Predictor.from_run(cancer_run)
    path = pd.read_csv(demo_split_csv)["path"].iloc[0]
    assert predictor.explain(path, head="cancer").ndim == 2
    with pytest.raises(DataError, match="no 'organ' head"):
        predictor.explain(path, head="organ")


def test_evaluate_explain_adds_a_figure_to_the_report(joint_run, tmp_path):
    from multitask.evaluate import evaluate_run

    metrics = evaluate_run(joint_run, out=tmp_path, explain=3)
    assert metrics["explain"]["n"] == 3 and metrics["explain"]["layer"] == "mixed7"  # 75 px: mixed10 is 1x1
    assert (tmp_path / "explain.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Grad-CAM per head](explain.png)" in (tmp_path / "report.md").read_text()


def test_a_flat_map_is_recognised():
    from multitask.explain import is_flat

    assert is_flat(np.zeros((3, 3)))  # nothing raised the explained class's score: Grad-CAM's ReLU left zeros
    assert is_flat(np.full((3, 3), 0.7))
    peaked = np.zeros((3, 3))
    peaked[1, 2] = 1.0
    assert not is_flat(peaked)


def test_flat_maps_are_named_by_predict_and_evaluate(joint_run, demo_data, tmp_path, monkeypatch, capsys):
    """Issue 20: an all-dark Grad-CAM (the kidney image's cancer head at 160 px) was shown with no note. Every map
    is made flat here (the tiny run's real maps may or may not be): predict and evaluate both say so."""
    from multitask import cli, explain
    from multitask.evaluate import evaluate_run

    monkeypatch.setattr(explain, "is_flat", lambda heatmap: True)
    image = next((demo_data / "Multi Cancer" / "Multi Cancer" / "Oral Cancer").rglob("*.jpg"))
    out = tmp_path / "pred.csv"
    assert cli.main(["predict", str(joint_run), str(image), "--explain", str(tmp_path / "cams"),
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 organ, 1 cancer overlay(s) are flat" in printed and "shows no location" in printed
    frame = pd.read_csv(out)
    assert frame["explain_organ_flat"].tolist() == [True] and frame["explain_cancer_flat"].tolist() == [True]

    metrics = evaluate_run(joint_run, out=tmp_path / "eval", explain=2)
    assert metrics["explain"]["flat"] == {"organ": 2, "cancer": 2}
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "**Flat maps**: 2 of the 2 organ maps, 2 of the 2 cancer maps" in report
