"""Choose the real-data training recipe by measurement: repeated grouped splits, judged on VALIDATION only.

    python scripts/sweep_defaults.py --data ../shared/data/real-sample \
        --weights "$(../shared/tools/pretrained-weights)" --out artifacts/sweep \
        --recipes frozen-160,frozen-256,tuned-256-mixed7-e3 --seeds 42,7,1234

Each recipe trains once per seed, on that seed's grouped 70/15/15 split (made once per seed and saved), with one
feature cache shared by every run. A recipe is scored on the validation split (organ balanced accuracy, cancer
ROC-AUC and balanced accuracy at the run's operating point, and per-organ sensitivity / specificity), averaged over
the seeds, because one small validation split is noisy; the recipe with the best mean of organ balanced accuracy
and cancer ROC-AUC wins, and replaces today's default only if it also scores higher than the default on every seed
both ran (:func:`verdict`): a mean gain that one split reverses is within the split-to-split noise. The test
split is scored too, for the README, and never used to choose. Writes ``runs.csv`` (one row per run),
``sweep.csv`` (one row per recipe: mean and min-max over the seeds) and ``sweep.json`` into ``--out``, and prints
both tables, the winner and the verdict.

A recipe is training settings (TrainConfig fields: image size, fine-tuning, ``augment``, ``balance``...) plus
evaluation options (:data:`EVALUATION_OPTIONS`: ``tta``, flip test-time augmentation, scored with
``evaluate_run(..., tta=True)``). Recipes that train the same model share one run per seed: a ``-tta`` recipe
scores its twin's run again instead of training it twice, and reports the twin's training time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

from multitask.data import scan  # noqa: E402
from multitask.evaluate import evaluate_run  # noqa: E402
from multitask.rundir import CONFIG_FILE, open_run  # noqa: E402
from multitask.settings import TrainConfig  # noqa: E402
from multitask.splits import save_split, split_manifest  # noqa: E402
from multitask.train import train  # noqa: E402

# The candidates: image size, fine-tuning (epochs, the block unfrozen from and its learning rate), augmentation
# strength, organ-balanced sample weights, the cancer head's loss weight and flip test-time augmentation, on top of
# the frozen defaults.
RECIPES = {
    "frozen-160": {"image_size": 160},
    "frozen-256": {"image_size": 256},
    "frozen-299": {"image_size": 299},
    "tuned-256-mixed9-e3": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed9"},
    "tuned-256-mixed7-e2": {"image_size": 256, "fine_tune_epochs": 2, "unfreeze_from": "mixed7"},
    "tuned-256-mixed7-e3": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed7"},
    "tuned-299-mixed7-e2": {"image_size": 299, "fine_tune_epochs": 2, "unfreeze_from": "mixed7"},
    "tuned-299-mixed7-e3": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7"},
    "tuned-299-mixed7-e3-noaug": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                  "augment": "none"},
    "tuned-299-mixed7-e3-tta": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7", "tta": True},
    "tuned-299-mixed7-e3-lr3e-5": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "fine_tune_learning_rate": 3e-5},
    "tuned-299-mixed7-e3-lr1e-4": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "fine_tune_learning_rate": 1e-4},
    "tuned-299-mixed7-e3-lr3e-4": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "fine_tune_learning_rate": 3e-4},
    "tuned-299-mixed7-e4-lr1e-4": {"image_size": 299, "fine_tune_epochs": 4, "unfreeze_from": "mixed7",
                                   "fine_tune_learning_rate": 1e-4},
    "tuned-299-mixed9-e3-lr1e-4": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed9",
                                   "fine_tune_learning_rate": 1e-4},
    "tuned-299-mixed7-e3-lr1e-4-cos": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                       "fine_tune_learning_rate": 1e-4, "fine_tune_schedule": "cosine"},
    "tuned-299-mixed7-e3-lr3e-4-cos": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                       "fine_tune_learning_rate": 3e-4, "fine_tune_schedule": "cosine"},
    "tuned-299-mixed7-e3-cancer2": {"image_size": 299, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                    "loss_weights": {"organ": 1.0, "cancer": 2.0}},
    "frozen-384": {"image_size": 384},
    "tuned-384-mixed7-e3": {"image_size": 384, "fine_tune_epochs": 3, "unfreeze_from": "mixed7"},
    "tuned-384-mixed7-e3-lr1e-4": {"image_size": 384, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "fine_tune_learning_rate": 1e-4},
    "frozen-256-organs": {"image_size": 256, "balance": "organs"},
    "frozen-256-tta": {"image_size": 256, "tta": True},
    "tuned-256-mixed7-e3-noaug": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                  "augment": "none"},
    "tuned-256-mixed7-e3-strong": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "augment": "strong"},
    "tuned-256-mixed7-e3-organs": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed7",
                                   "balance": "organs"},
    "tuned-256-mixed7-e3-tta": {"image_size": 256, "fine_tune_epochs": 3, "unfreeze_from": "mixed7", "tta": True},
}
EVALUATION_OPTIONS = ("tta",)  # recipe keys that say how a run is scored, not how it is trained
CHOICE = ("val_organ_bacc", "val_cancer_auc")  # the recipe with the best mean of these (over seeds) wins
SWEPT_FINE_TUNE_LR = 1e-5  # the fine-tuning rate of every recipe that names none: the default when they were swept
SWEPT_SCHEDULE = "constant"  # likewise the fine-tuning schedule of every recipe that names none


def training_settings(recipe: str) -> dict:
    """The TrainConfig fields of ``recipe`` (its evaluation options left out): fine-tuning off, at
    :data:`SWEPT_FINE_TUNE_LR` and :data:`SWEPT_SCHEDULE` unless it says, so each recipe trains as it did when its
    row was measured."""
    return {"fine_tune_epochs": 0, "fine_tune_learning_rate": SWEPT_FINE_TUNE_LR, "fine_tune_schedule": SWEPT_SCHEDULE,
            **{k: v for k, v in RECIPES[recipe].items() if k not in EVALUATION_OPTIONS}}


def default_recipe() -> str | None:
    """The first recipe that trains what ``multitask train --weights W`` trains today (TrainConfig's defaults with
    pretrained weights), or None when no recipe does."""
    today = TrainConfig(weights="pretrained.weights.h5")
    return next((name for name in RECIPES if not set(RECIPES[name]) & set(EVALUATION_OPTIONS)
                 and all(getattr(today, k) == v for k, v in training_settings(name).items())), None)


def verdict(runs: pd.DataFrame, winner: str, default: str | None) -> tuple[str, str]:
    """The recipe to make the default, and why: the validation ``winner`` only if its choice score beats the
    ``default``'s on every seed both ran; else the default stays (a gain that one split reverses is noise)."""
    if default is None or default not in set(runs["recipe"]):
        return winner, f"{winner} wins; today's default was not swept, so nothing to compare it with"
    if winner == default:
        return default, f"the default, {default}, wins"
    score = runs.assign(choice=runs[list(CHOICE)].mean(axis=1)).pivot(index="seed", columns="recipe",
                                                                      values="choice")
    gains = (score[winner] - score[default]).dropna()
    per_seed = ", ".join(f"seed {seed} {gain:+.3f}" for seed, gain in gains.items())
    if len(gains) and (gains > 0).all():
        return winner, f"{winner} beats the default, {default}, on every seed ({per_seed}): it should replace it"
    return default, (f"{winner} has the best mean, but not a higher score than the default, {default}, on every "
                     f"seed ({per_seed}): the default stays")


def trained_as(recipe: str) -> str:
    """The first recipe that trains the same model as ``recipe`` (itself, unless only evaluation options differ)."""
    return next(name for name in RECIPES if training_settings(name) == training_settings(recipe))


def recipe_config(recipe: str, seed: int, *, split_file: Path, out: Path, weights: str) -> TrainConfig:
    """The validated TrainConfig of ``recipe`` for ``seed``: its run goes to runs/<trained_as>-s<seed>."""
    return TrainConfig(out=str(out / "runs" / f"{trained_as(recipe)}-s{seed}"), split_file=str(split_file),
                       weights=weights, seed=seed, cache_dir=str(out / "cache"), overwrite=True, verbose=0,
                       **training_settings(recipe)).validate()


def scores(run_dir: Path, split: str, out: Path, *, tta: bool = False) -> dict:
    """One split's headline numbers and per-organ cancer sensitivity / specificity at the run's operating point."""
    metrics = evaluate_run(run_dir, split=split, out=out, resamples=200, tta=tta)
    organ, cancer = metrics.get("organ", {}), metrics["cancer"]
    row = {f"{split}_organ_acc": organ.get("accuracy"), f"{split}_organ_bacc": organ.get("balanced_accuracy"),
           f"{split}_cancer_auc": cancer["roc_auc"], f"{split}_cancer_bacc": cancer["balanced_accuracy"],
           f"{split}_cancer_sens": cancer.get("sensitivity"), f"{split}_cancer_spec": cancer.get("specificity")}
    for name, per in (cancer.get("per_organ") or {}).items():
        row[f"{split}_sens_{name}"] = per.get("sensitivity")
        row[f"{split}_spec_{name}"] = per.get("specificity")
    return row


def run_one(recipe: str, seed: int, *, split_file: Path, out: Path, args, rows: list[dict]) -> dict:
    """Train ``recipe`` for ``seed`` (or reuse the run of a twin in ``rows`` that trained the same model, see
    :func:`trained_as`) and score it on val and test."""
    config = recipe_config(recipe, seed, split_file=split_file, out=out, weights=args.weights)
    run_dir = Path(config.out)
    twin = next((r for r in rows if r["seed"] == seed and r["recipe"] in RECIPES
                 and trained_as(r["recipe"]) == trained_as(recipe)), None)
    if twin is not None and (run_dir / CONFIG_FILE).is_file():
        info, train_s = open_run(run_dir), twin["train_s"]
    else:
        start = time.perf_counter()
        info = train(config)
        train_s = round(time.perf_counter() - start, 1)
    row = {"recipe": recipe, "seed": seed, "train_s": train_s,
           "saved": f"{info.config['saved']['phase']}@{info.config['saved']['epoch']}"}
    for split in ("val", "test"):
        row.update(scores(run_dir, split, out / "eval" / f"{recipe}-s{seed}" / split,
                          tta=RECIPES[recipe].get("tta", False)))
    print(pd.Series(row).to_string(), flush=True)
    return row


def split_for(seed: int, *, data: str, out: Path) -> Path:
    """The grouped split of ``seed``, made once and reused by every recipe (keypoints cached across seeds)."""
    path = out / "splits" / f"split-s{seed}.csv"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_split(split_manifest(scan(data), seed=seed, cache_dir=out / "cache" / "keypoints"), path)
    return path


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Per recipe: mean over seeds of every number, with (min-max) for the validation numbers that choose."""
    numbers = runs.drop(columns=["seed", "saved"]).groupby("recipe", sort=False)
    table = numbers.mean(numeric_only=True)
    for column in (*CHOICE, "val_cancer_bacc"):
        table[f"{column}_range"] = [f"{lo:.3f}-{hi:.3f}" for lo, hi in zip(numbers[column].min(),
                                                                           numbers[column].max(), strict=True)]
    table["choice_score"] = table[list(CHOICE)].mean(axis=1)
    return table.sort_values("choice_score", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", default="artifacts/sweep")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="42,7,1234")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    recipes = [r for r in args.recipes.split(",") if r]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    seeds = [int(s) for s in args.seeds.split(",")]

    done = out / "runs.csv"
    rows = pd.read_csv(done).to_dict("records") if done.is_file() else []  # a rerun skips what is measured
    for seed in seeds:
        split_file = split_for(seed, data=args.data, out=out)
        for recipe in recipes:
            if any(r["recipe"] == recipe and r["seed"] == seed for r in rows):
                continue
            rows.append(run_one(recipe, seed, split_file=split_file, out=out, args=args, rows=rows))
            pd.DataFrame(rows).to_csv(done, index=False)
    runs = pd.DataFrame(rows)
    runs = runs[runs["recipe"].isin(recipes) & runs["seed"].isin(seeds)]
    table = summarise(runs)
    table.to_csv(out / "sweep.csv")
    default = default_recipe()
    chosen, why = verdict(runs, table.index[0], default)
    (out / "sweep.json").write_text(json.dumps({"seeds": seeds, "choice": list(CHOICE), "winner": table.index[0],
                                                "default": default, "chosen": chosen, "verdict": why,
                                                "recipes": {r: RECIPES[r] for r in recipes},
                                                "table": json.loads(table.to_json(orient="index"))}, indent=2))
    pd.set_option("display.width", 250)
    headline = [*CHOICE, "val_cancer_bacc", "test_organ_bacc", "test_cancer_auc", "test_cancer_bacc", "train_s"]
    print(table[headline + [f"{c}_range" for c in CHOICE]].round(3).to_string())
    print(f"winner on validation (mean of {' and '.join(CHOICE)} over seeds {seeds}): {table.index[0]}")
    print(f"verdict: {why}")


if __name__ == "__main__":
    main()
