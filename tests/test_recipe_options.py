"""The recipe options of issue 22: organ-balanced sample weights, augmentation strength, flip test-time augmentation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from multitask import cli
from multitask.augment import AMOUNTS, JITTER, MAX_ROTATION, augment_amounts, make_augmenter
from multitask.data import balance_weights, class_weights, organ_weights, sample_weights
from multitask.errors import ConfigError, cli_message
from multitask.predict import Predictor
from multitask.report import _balance, _fine_tune_rate
from multitask.rundir import _as_saved_now
from multitask.settings import AUGMENTS, FINE_TUNE_LR_FACTOR, TrainConfig
from multitask.shards import operating_point
from multitask.train import Trainer

SWEEP = Path(__file__).resolve().parents[1] / "scripts" / "sweep_defaults.py"


@pytest.fixture
def six_three_one() -> pd.DataFrame:
    """Ten training rows of three organs, 6 / 3 / 1 images, with both cancer classes inside the largest organ."""
    return pd.DataFrame({"organ_id": [0] * 6 + [1] * 3 + [2],
                         "cancer_id": [0, 0, 0, 0, 1, 1] + [1, 1, 1] + [1]})


# ----------------------------------------------------------------------------------------------- --balance organs


def test_organ_weights_are_the_inverse_organ_share_with_mean_one(six_three_one):
    weights = organ_weights(six_three_one, ("organ", "cancer"))
    expected = {0: 10 / 18, 1: 10 / 9, 2: 10 / 3}  # n / (k * n_organ): 10 rows, 3 organs
    assert weights.keys() == {"organ", "cancer"}
    for task in ("organ", "cancer"):
        assert weights[task].keys() == expected.keys()
        np.testing.assert_allclose([weights[task][o] for o in expected], list(expected.values()), rtol=1e-12)
    per_row = sample_weights(six_three_one, weights, by="organ")
    # Both heads weigh a row by its ORGAN: the cancer head's weights do not follow the cancer class...
    np.testing.assert_array_equal(per_row["cancer"], per_row["organ"])
    np.testing.assert_allclose(per_row["cancer"], [10 / 18] * 6 + [10 / 9] * 3 + [10 / 3], rtol=1e-6)
    assert per_row["cancer"].mean() == pytest.approx(1.0)
    # ...and every organ's images together weigh the same in each head's loss.
    totals = pd.Series(per_row["cancer"]).groupby(six_three_one["organ_id"]).sum()
    np.testing.assert_allclose(totals, [10 / 3] * 3, rtol=1e-6)


def test_balance_modes_pick_their_weights(six_three_one):
    tasks = ("organ", "cancer")
    assert balance_weights(six_three_one, tasks, "none") is None
    assert balance_weights(six_three_one, tasks, "classes") == class_weights(six_three_one, tasks)
    assert balance_weights(six_three_one, tasks, "organs") == organ_weights(six_three_one, tasks)
    with pytest.raises(ConfigError, match="'both'"):
        balance_weights(six_three_one, tasks, "both")
    # The trainer reads "organs" weights by each row's organ and "classes" weights by each head's own class.
    organs = Trainer.sample_weights(SimpleNamespace(config=TrainConfig(data="x", balance="organs")), six_three_one,
                                    organ_weights(six_three_one, tasks))
    assert organs["cancer"][0] == organs["cancer"][4]  # same organ, other cancer class: same weight
    classes = Trainer.sample_weights(SimpleNamespace(config=TrainConfig(data="x", balance="classes")), six_three_one,
                                     class_weights(six_three_one, tasks))
    assert classes["cancer"][0] != classes["cancer"][4]  # 4 benign vs 6 malignant rows: class weights differ


def test_an_old_balance_switch_still_means_what_it_meant():
    old = {"data": "x", "balance": True}  # config.json before --balance had modes: true/false, no "augment"
    assert TrainConfig.from_dict(old).validate().balance == "classes"
    assert TrainConfig.from_dict({**old, "balance": False}).validate().balance == "none"
    assert TrainConfig(data="x", balance=True).balance == "classes"  # an older caller's keyword
    assert _balance({"balance": True}) == "classes" and _balance({"balance": False}) == "none"  # the model card
    assert _balance({"balance": "organs"}) == "organs"
    # An unfinished run started before the modes (and before --augment) resumes with the same meaning.
    saved_then = {**TrainConfig(data="x").to_dict(), "balance": False}
    del saved_then["augment"]
    assert _as_saved_now(saved_then) == TrainConfig(data="x", balance="none", augment="standard").to_dict()
    with pytest.raises(ConfigError, match="'sometimes'"):
        TrainConfig(data="x", balance="sometimes").validate()


def test_the_fine_tuning_rate_is_resolved_into_the_config_and_an_old_unset_one_keeps_its_meaning():
    config = TrainConfig(data="x")
    assert config.fine_tune_learning_rate == config.fine_tune_lr == 1e-4 * FINE_TUNE_LR_FACTOR
    assert config.to_dict()["fine_tune_learning_rate"] == 1e-4 * FINE_TUNE_LR_FACTOR  # config.json: the rate used
    assert TrainConfig(data="x", learning_rate=3e-4).fine_tune_lr == 3e-4 * FINE_TUNE_LR_FACTOR
    assert TrainConfig(data="x", fine_tune_learning_rate=2e-6).fine_tune_lr == 2e-6
    assert cli.build_parser().parse_args(["train", "--out", "run", "--data", "d"]).fine_tune_learning_rate is None
    # A config.json written before the rate was resolved holds null (or no key): that meant a tenth of learning_rate.
    old = {**TrainConfig(data="x", learning_rate=3e-4).to_dict(), "fine_tune_learning_rate": None}
    assert TrainConfig.from_dict(old).fine_tune_lr == 3e-4 / 10
    del old["fine_tune_learning_rate"]
    assert TrainConfig.from_dict(old).fine_tune_lr == 3e-4 / 10
    # So an unfinished run from then is compared with the rate it really used, and today's default is a change.
    assert _as_saved_now(old)["fine_tune_learning_rate"] == 3e-4 / 10 != FINE_TUNE_LR_FACTOR * 3e-4
    with pytest.raises(ConfigError, match="learning_rate must be a positive number, got 0"):
        TrainConfig(data="x", learning_rate=0).validate()


def test_the_fine_tuning_schedule_is_a_checked_setting_and_an_old_config_means_constant():
    assert TrainConfig(data="x").fine_tune_schedule == "constant"
    train = ["train", "--out", "run", "--data", "d"]
    assert cli.build_parser().parse_args(train).fine_tune_schedule == "constant"
    assert cli.build_parser().parse_args([*train, "--fine-tune-schedule", "cosine"]).fine_tune_schedule == "cosine"
    old = TrainConfig(data="x", fine_tune_schedule="cosine").to_dict()
    del old["fine_tune_schedule"]  # a config.json from before the setting: those runs kept the rate constant
    assert TrainConfig.from_dict(old).fine_tune_schedule == "constant"
    with pytest.raises(ConfigError, match="fine_tune_schedule must be one of constant, cosine, got 'linear'"):
        TrainConfig(data="x", fine_tune_schedule="linear").validate()
    # The model card says how the rate moved.
    assert _fine_tune_rate({**old, "fine_tune_learning_rate": 2e-4}) == "0.0002"
    assert _fine_tune_rate({**old, "fine_tune_learning_rate": 2e-4, "fine_tune_schedule": "cosine"}) == (
        "0.0002, cosine-decayed to 0")


def test_a_cosine_schedule_decays_to_zero_and_a_resumed_phase_goes_on_where_it_stopped(tmp_path):
    import keras

    from multitask.accelerate import make_optimizer
    from multitask.callbacks import EpochBackup

    def trainer(decay_steps):
        image = keras.Input((3,))
        model = keras.Model(image, keras.layers.Dense(1)(image))
        model.compile(optimizer=make_optimizer(1e-2, precision="float32", decay_steps=decay_steps), loss="mse")
        return model

    x, y = np.ones((16, 3), "float32"), np.zeros((16, 1), "float32")
    backup = EpochBackup(tmp_path / "backup")
    first = trainer(8)
    first.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[backup])  # 4 of the phase's 8 steps
    assert int(first.optimizer.iterations) == 4
    assert float(first.optimizer.learning_rate) == pytest.approx(1e-2 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    # A new process resumes from the backup: the step count comes back with the weights, and so does the rate.
    again = trainer(8)
    assert backup.restore(again) == 1
    assert int(again.optimizer.iterations) == 4
    assert float(again.optimizer.learning_rate) == pytest.approx(5e-3)
    again.fit(x, y, batch_size=4, initial_epoch=1, epochs=2, verbose=0)
    assert float(again.optimizer.learning_rate) == pytest.approx(0.0, abs=1e-12)
    constant = trainer(None)
    constant.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert float(constant.optimizer.learning_rate) == pytest.approx(1e-2)


def test_balance_and_augment_flags_parse():
    parser = cli.build_parser()
    train = ["train", "--out", "run", "--data", "d"]
    assert parser.parse_args(train).balance == "none"
    assert parser.parse_args([*train, "--balance"]).balance == "classes"  # the bare flag keeps its old meaning
    assert parser.parse_args([*train, "--balance", "organs"]).balance == "organs"
    assert parser.parse_args([*train, "--balance", "--augment", "strong"]).augment == "strong"
    assert parser.parse_args(train).augment == "standard"
    with pytest.raises(SystemExit):
        parser.parse_args([*train, "--augment", "wild"])


# ----------------------------------------------------------------------------------------------- --augment


def test_augment_strength_default_is_todays_and_a_bad_one_is_named():
    assert TrainConfig(data="x").augment == "standard"
    assert augment_amounts("standard") == (0.03, 0.1) == (MAX_ROTATION, JITTER)  # what every earlier run used
    assert set(AMOUNTS) == set(AUGMENTS)
    strong, standard = augment_amounts("strong"), augment_amounts("standard")
    assert strong.max_rotation > standard.max_rotation and strong.jitter > standard.jitter
    assert augment_amounts("none") is None and make_augmenter(0, strength="none") is None
    for bad in (lambda: TrainConfig(data="x", augment="wild").validate(), lambda: augment_amounts("wild")):
        with pytest.raises(ConfigError) as caught:
            bad()
        assert "'wild'" in str(caught.value) and "--augment" in cli_message(caught.value)


# ----------------------------------------------------------------------------------------------- --tta


def tta_twin(predictor: Predictor, **overrides) -> Predictor:
    """``predictor``'s engine and operating point with flip TTA on (no second model load)."""
    options = dict(labels=predictor.labels, threshold=predictor.threshold, ood_threshold=predictor.ood_threshold,
                   organ_thresholds=predictor.organ_thresholds, threshold_source=predictor.threshold_source)
    return Predictor(predictor.engine, **{**options, **overrides}, tta=True)


def test_tta_leaves_a_mirror_symmetric_image_unchanged(joint_predictor):
    size = joint_predictor.image_size
    half = np.random.default_rng(0).integers(0, 256, (1, size, size, 3)).astype(np.float32)
    symmetric = (half + half[:, :, ::-1, :]) / 2  # exactly equal to its horizontal mirror
    plain = joint_predictor.predict_arrays(symmetric)
    flipped = tta_twin(joint_predictor).predict_arrays(symmetric)
    assert plain.keys() == flipped.keys() and "ood_score" in plain
    for name in plain:
        np.testing.assert_allclose(flipped[name], plain[name], rtol=1e-5, atol=1e-6)


def test_tta_averages_an_image_with_its_mirror(joint_predictor, tmp_path):
    size = joint_predictor.image_size
    ramp = np.linspace(0, 255, size, dtype=np.float32)  # dark on the left, bright on the right, with a blob
    image = np.repeat(np.repeat(ramp[None, None, :, None], size, axis=1), 3, axis=3)
    image[0, size // 3: size // 2, : size // 4, 0] = 255.0
    mirror = image[:, :, ::-1, :].copy()
    plain, mirrored = joint_predictor.predict_arrays(image), joint_predictor.predict_arrays(mirror)
    tta = tta_twin(joint_predictor)
    averaged = tta.predict_arrays(image)
    for task in joint_predictor.tasks:
        assert np.abs(plain[task] - mirrored[task]).max() > 1e-3  # the mirror answers differently: not vacuous
        np.testing.assert_allclose(averaged[task], (plain[task] + mirrored[task]) / 2, rtol=1e-5, atol=1e-6)
    # The OOD score is the original image's, not the mirror's nor their mean.
    assert abs(plain["ood_score"][0] - mirrored["ood_score"][0]) > 1e-4
    np.testing.assert_allclose(averaged["ood_score"], plain["ood_score"], rtol=1e-5)
    # The organ is the argmax of the averaged probabilities, and its own threshold decides the cancer answer.
    organs = joint_predictor.labels["organ"]
    own = {organ: 0.05 + 0.1 * i for i, organ in enumerate(organs)}
    row = tta_twin(joint_predictor, organ_thresholds=own).predict_images([image[0]], ["ramp"]).iloc[0]
    organ = organs[int(np.argmax((plain["organ"] + mirrored["organ"])[0]))]
    assert row["organ"] == organ and row["tta"]
    assert row["malignancy_threshold"] == pytest.approx(own[organ]) and row["threshold_source"] == "organ"
    # Parts of a sharded job made with and without TTA are never merged as one.
    assert operating_point(tta) != operating_point(joint_predictor)
    assert "tta" not in joint_predictor.predict_images([image[0]], ["ramp"]).columns


def test_predict_cli_says_tta(joint_run, demo_split_csv, tmp_path, capsys):
    split = pd.read_csv(demo_split_csv)
    files = split.loc[split["split"] == "test", "path"].head(2).tolist()
    out = tmp_path / "tta.csv"
    assert cli.main(["predict", str(joint_run), *files, "--tta", "--out", str(out)]) == 0
    assert "with flip TTA" in capsys.readouterr().out
    frame = pd.read_csv(out)
    assert frame["tta"].tolist() == [True, True]


def test_evaluate_with_tta_says_so(joint_run, tmp_path):
    from multitask.evaluate import MODEL_CARD_FILE, PREDICTIONS_FILE, REPORT_FILE, evaluate_run

    metrics = evaluate_run(joint_run, split="val", out=tmp_path / "eval", resamples=20, tta=True)
    assert metrics["tta"] is True
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["tta"] is True
    for name in (REPORT_FILE, MODEL_CARD_FILE):
        assert "flip test-time augmentation (--tta)" in (tmp_path / "eval" / name).read_text()
    assert pd.read_csv(tmp_path / "eval" / PREDICTIONS_FILE)["tta"].all()


# ----------------------------------------------------------------------------------------------- the sweep


def _sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_defaults", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_every_sweep_recipe_builds_a_valid_config(tmp_path):
    sweep = _sweep_module()
    for recipe in sweep.RECIPES:
        config = sweep.recipe_config(recipe, 42, split_file=tmp_path / "split.csv", out=tmp_path, weights="w")
        assert config.image_size == sweep.RECIPES[recipe]["image_size"]
    tta = sweep.recipe_config("tuned-256-mixed7-e3-tta", 7, split_file=tmp_path / "s.csv", out=tmp_path, weights="w")
    assert tta.out.endswith("tuned-256-mixed7-e3-s7")  # scored with TTA on its twin's run: trained once
    assert sweep.RECIPES["tuned-256-mixed7-e3-tta"]["tta"] is True
    assert sweep.recipe_config("tuned-256-mixed7-e3-strong", 7, split_file=tmp_path / "s.csv", out=tmp_path,
                               weights="w").augment == "strong"
    assert sweep.recipe_config("frozen-256-organs", 7, split_file=tmp_path / "s.csv", out=tmp_path,
                               weights="w").balance == "organs"
    # The rows measured before the fine-tuning rate was swept keep the rate they ran at; today's default is a row.
    assert sweep.recipe_config("tuned-299-mixed7-e3", 7, split_file=tmp_path / "s.csv", out=tmp_path,
                               weights="w").fine_tune_lr == 1e-5
    # And the schedule: constant unless the recipe says.
    assert sweep.recipe_config("tuned-299-mixed7-e3-lr1e-4", 7, split_file=tmp_path / "s.csv", out=tmp_path,
                               weights="w").fine_tune_schedule == "constant"
    assert sweep.recipe_config("tuned-299-mixed7-e3-lr1e-4-cos", 7, split_file=tmp_path / "s.csv", out=tmp_path,
                               weights="w").fine_tune_schedule == "cosine"
    # Today's default is a swept row: the one the verdict compares every challenger with.
    default = TrainConfig(split_file="s.csv", weights="w")
    assert sweep.default_recipe() == "tuned-299-mixed7-e3-lr1e-4"
    assert sweep.training_settings(sweep.default_recipe()) == {
        "fine_tune_epochs": default.fine_tune_epochs, "fine_tune_learning_rate": default.fine_tune_learning_rate,
        "fine_tune_schedule": default.fine_tune_schedule, "image_size": default.image_size,
        "unfreeze_from": default.unfreeze_from}


def test_the_sweep_replaces_the_default_only_with_a_recipe_better_on_every_seed():
    sweep = _sweep_module()
    default, challenger = "tuned-299-mixed7-e3-lr1e-4", "tuned-299-mixed7-e3-lr3e-4"

    def runs(challenger_scores):  # choice score = the mean of the two CHOICE columns
        return pd.DataFrame([{"recipe": recipe, "seed": seed, "val_organ_bacc": score, "val_cancer_auc": score}
                             for recipe, scores in ((default, (0.93, 0.95, 0.96)), (challenger, challenger_scores))
                             for seed, score in zip((42, 7, 1234), scores, strict=True)])

    # The reproducible rerun of the sweep (README "Training"): a higher mean, but lower on seed 1234.
    chosen, why = sweep.verdict(runs((0.96, 0.96, 0.955)), challenger, default)
    assert chosen == default
    assert why == (f"{challenger} has the best mean, but not a higher score than the default, {default}, on every "
                   "seed (seed 7 +0.010, seed 42 +0.030, seed 1234 -0.005): the default stays")
    chosen, why = sweep.verdict(runs((0.94, 0.96, 0.97)), challenger, default)
    assert chosen == challenger and why.endswith("on every seed (seed 7 +0.010, seed 42 +0.010, seed 1234 +0.010): "
                                                 "it should replace it")
    assert sweep.verdict(runs((0.94, 0.96, 0.97)), default, default)[0] == default
    unswept = runs((0.94, 0.96, 0.97)).query("recipe != @default")
    assert sweep.verdict(unswept, challenger, default) == (
        challenger, f"{challenger} wins; today's default was not swept, so nothing to compare it with")
