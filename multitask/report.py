"""What ``evaluate`` writes for people: ``report.md`` (the numbers with their intervals and figures) and
``MODEL_CARD.md`` (Mitchell et al., 2019, "Model Cards for Model Reporting"), both filled from the run and the
metrics, never by hand."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import pandas as pd

from multitask.calibration import format_interval
from multitask.rundir import RunInfo
from multitask.settings import balance_mode, saved_fine_tune_rate

HEADLINE = {  # metric key -> how the report names it, per head
    "accuracy": "accuracy", "balanced_accuracy": "balanced accuracy", "macro_f1": "macro-F1",
    "roc_auc": "ROC-AUC", "sensitivity": "sensitivity (Malignant recall)", "specificity": "specificity",
    "ece": "expected calibration error (15 bins)", "ece_uncalibrated": "ECE before calibration",
    "brier": "Brier score",
}


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _markdown(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def with_interval(metrics: dict[str, Any], key: str) -> str:
    """``0.970 (0.955-0.982)`` for ``metrics[key]`` and its ``ci95`` entry (the bare value without one)."""
    lo, hi = (metrics.get("ci95", {}).get(key) or (None, None))
    return format_interval(metrics.get(key), lo, hi)


def overlap_note(overlap: dict[str, Any] | None) -> str | None:
    """One sentence on an evaluation's overlap with the run's train/val images, or None when there is none."""
    if not overlap or not overlap["fraction"]:
        return None
    n = overlap["train"] + overlap["val"]
    return (f"{n} of the evaluated images ({overlap['fraction']:.1%}) are in the run's own split.csv (train "
            f"{overlap['train']}, val {overlap['val']}): the model was fitted or selected on them, so expect "
            "optimistic numbers; evaluate the test split or images the run has not seen")


def below_target_note(cancer: dict[str, Any]) -> str | None:
    """One sentence naming every organ whose cancer sensitivity (at its operating point) is below the run's target,
    with its interval and number of malignant images; None when there is none (or no target)."""
    weak = [(organ, cancer["per_organ"][organ]) for organ in cancer.get("organs_below_target", [])]
    if not weak:
        return None
    shown = "; ".join(f"{organ} {with_interval(row, 'sensitivity')} on {row['n_malignant']} malignant image(s)"
                      for organ, row in weak)
    return (f"sensitivity below the target {cancer['target_sensitivity']:.2f} in {len(weak)} organ(s): {shown}. "
            "Malignant images of these organs are missed more often than the operating point promises")


def organ_thresholds_note(cancer: dict[str, Any]) -> str | None:
    """One sentence listing the per-organ thresholds the cancer head decided with, or None without them."""
    table = cancer.get("organ_thresholds") or {}
    if not table:
        return None
    shown = ", ".join(f"{organ} {row['threshold']:.3f}" + ("" if row["source"] == "organ" else " (global)")
                      for organ, row in table.items())
    return (f"Per-organ thresholds, applied by the PREDICTED organ: {shown}. (global): fewer than the needed "
            "malignant and benign validation images of that organ, so the global threshold applies")


def calibration_sentence(metrics: dict[str, Any]) -> str:
    """Which heads' probabilities are calibrated, and why a head kept its raw ones (T = 1: its fitted temperature
    did not lower the validation ECE)."""
    if not metrics["calibrated"]:
        return "Probabilities are uncalibrated (raw softmax)."
    kept = [t for t in metrics["tasks"] if not metrics[t].get("calibration_note")]
    text = (f"Probabilities are calibrated (temperature-scaled) for the {' and '.join(kept)} "
            f"head{'s' if len(kept) > 1 else ''}." if kept else "")
    notes = [f"The {t} head is {metrics[t]['calibration_note']}." for t in metrics["tasks"]
             if metrics[t].get("calibration_note")]
    return " ".join([text, *notes]).strip()


def flat_maps_note(explain: dict[str, Any]) -> list[str]:
    """Report lines that name the heads whose Grad-CAM maps were flat (titled "(flat map)" in the figure)."""
    from multitask.explain import FLAT_NOTE

    flat = {task: n for task, n in explain.get("flat", {}).items() if n}
    if not flat:
        return []
    counts = ", ".join(f"{n} of the {explain['n']} {task} maps" for task, n in flat.items())
    return ["", f"> **Flat maps**: {counts} (titled \"flat map\"): {FLAT_NOTE}."]


def data_root(settings: dict[str, Any], split: pd.DataFrame) -> str:
    """The folder the run's images came from: ``--data``, else the folder above the type folders of the split's
    files (``<root>/<Type>/<subclass>/<file>``), never the split CSV itself."""
    if settings.get("data"):
        return str(settings["data"])
    parents = {os.path.dirname(os.path.dirname(os.path.dirname(str(path)))) for path in split["path"]}
    return os.path.commonpath(sorted(parents)) if parents else "n/a"


def _where(metrics: dict[str, Any]) -> str:
    source = metrics["source"]
    if source["kind"] == "split":
        return f"the `{source['split']}` split of `{source['path']}`"
    return f"every labelled image under `{source['path']}`"


# ----------------------------------------------------------------------------------------------- report.md


def tta_sentence(metrics: dict[str, Any]) -> str:
    """" With flip test-time augmentation: ..." when the evaluation used it (metrics["tta"]), else ""."""
    if not metrics.get("tta"):
        return ""
    return (" With flip test-time augmentation (--tta): each image's probabilities are the mean of the image's and "
            "its horizontal mirror's, at twice the inference cost; the OOD score is the original image's.")


def render_report(metrics: dict[str, Any]) -> str:
    """The markdown report of a metrics dict from :func:`multitask.evaluate.evaluate_run`."""
    boot = metrics["bootstrap"]
    lines = [f"# Evaluation of `{metrics['run']}`", "",
             f"{metrics['n_images']} images: {_where(metrics)}, at {metrics['image_size']} px. "
             f"{calibration_sentence(metrics)}{tta_sentence(metrics)} Intervals are 95% bootstrap intervals "
             f"({boot['resamples']:,} resamples of the evaluated images, stratified by true class, seed {boot['seed']})"
             + (f"; {boot['small_groups']}." if boot.get("small_groups") else "."), ""]
    note = overlap_note(metrics.get("overlap"))
    if note:
        lines += [f"> **Warning**: {note}.", ""]
    if metrics["unreadable"]:
        lines += [f"{len(metrics['unreadable'])} unreadable file(s) left out:", ""]
        lines += [f"- `{path}`: {why}" for path, why in metrics["unreadable"].items()] + [""]
    skipped = metrics["source"].get("skipped_folders", {})
    lines += [f"- skipped `{folder}` ({count} images): not a subclass of the run's taxonomy"
              for folder, count in skipped.items()] + ([""] if skipped else [])
    for task in metrics["tasks"]:
        lines += _task_section(task, metrics[task])
    if "ood" in metrics:
        ood = metrics["ood"]
        lines += ["", "## Out-of-distribution check", "",
                  f"{ood['n_flagged']} of {metrics['n_images']} evaluated images are flagged as unlike the training "
                  f"images: {with_interval(ood, 'fraction')} (threshold {ood['threshold']:.3g} on the OOD score, the "
                  "99th percentile of held-out in-distribution images)."]
    if "explain" in metrics:
        lines += ["", "## Where the heads look", "",
                  f"Grad-CAM on InceptionV3's `{metrics['explain']['layer']}` block for the predicted class of each "
                  f"head, {metrics['explain']['n']} images (titles: true -> predicted).", "",
                  f"![Grad-CAM per head]({metrics['explain']['figure']})"]
        lines += flat_maps_note(metrics["explain"])
    return "\n".join(lines) + "\n"


def _task_section(task: str, m: dict[str, Any]) -> list[str]:
    keys = [k for k in HEADLINE if m.get(k) is not None]
    lines = ["", f"## {task}", ""]
    if task == "cancer":
        lines += [f"Malignant when P(Malignant) >= **{m['threshold']:.3f}** ({m['threshold_source']}).", ""]
        note = organ_thresholds_note(m)
        lines += [note + ".", ""] if note else []
    lines += _markdown([[HEADLINE[k], with_interval(m, k)] for k in keys], ["metric", "value (95% interval)"])
    if "at_global" in m:
        lines += ["", f"At the global threshold {m['threshold']:.3f} for every image instead: sensitivity "
                      f"{with_interval(m['at_global'], 'sensitivity')}, specificity "
                      f"{with_interval(m['at_global'], 'specificity')}."]
    if "at_0.5" in m:
        half = m["at_0.5"]
        lines += ["", f"At the conventional 0.5 instead: sensitivity {with_interval(half, 'sensitivity')}, "
                      f"specificity {with_interval(half, 'specificity')}."]
    lines.append("")
    if m.get("notes"):
        lines += [f"> note: {note}" for note in m["notes"]] + [""]
    per_class = [[label, with_interval(v, "precision"), with_interval(v, "recall"), _fmt(v["f1"]), v["support"]]
                 for label, v in m["per_class"].items()]
    lines += [*_markdown(per_class, ["class", "precision", "recall", "F1", "images"]), ""]
    if "per_organ" in m:
        lines += _per_organ_section(m)
    lines += [f"![{task} {name.replace('_', ' ')}]({file})" for name, file in m["figures"].items()]
    return lines


def _per_organ_section(m: dict[str, Any]) -> list[str]:
    """The cancer head within each true organ, at its operating point and (with per-organ thresholds) the global
    one; organs below the target sensitivity are flagged in the table and named below it."""
    header = ["organ", "images", "malignant", "threshold", "accuracy", "sensitivity", "specificity"]
    rows = []
    for organ, v in m["per_organ"].items():
        row = [organ, v["n"], v["n_malignant"], f"{v['threshold']:.3f} ({v['threshold_source']})",
               with_interval(v, "accuracy"), with_interval(v, "sensitivity"), with_interval(v, "specificity")]
        if "at_global" in v:
            row += [with_interval(v["at_global"], "sensitivity"), with_interval(v["at_global"], "specificity")]
        rows.append([*row, "**below target**" if v.get("below_target") else ""])
    if any("at_global" in v for v in m["per_organ"].values()):
        header += ["sensitivity at global", "specificity at global"]
    lines = ["Cancer head within each true organ, each image decided at its predicted organ's threshold (exact "
             "binomial 95% intervals: small organs give wide ones):", "", *_markdown(rows, [*header, "flag"]), ""]
    note = below_target_note(m)
    return lines + ([f"> **Below target**: {note}.", ""] if note else [])


# ----------------------------------------------------------------------------------------------- MODEL_CARD.md


def render_model_card(run: RunInfo, metrics: dict[str, Any], *, split: pd.DataFrame,
                      audit: dict[str, Any] | None = None, synthetic: bool = False) -> str:
    """MODEL_CARD.md: Mitchell et al.'s sections, filled from the run folder and the evaluation's metrics."""
    config, settings = run.config, run.config.get("settings", {})
    calibration = run.calibration
    lines = [f"# Model card: `{run.path.name}`", "",
             "*Generated by `multitask evaluate` from the run folder and this evaluation; edit the run, not this "
             "file.*", "", "## Model details", ""]
    lines += [f"- **Model:** one InceptionV3 backbone with {len(run.tasks)} head(s) ({', '.join(run.tasks)}), "
              f"trained jointly ({config['task']}); input RGB images at {run.image_size} px.",
              f"- **Initialisation:** `{settings.get('weights')}`; phase 1 {config['epochs']['heads']} epoch(s) of "
              f"the heads on a frozen backbone, phase 2 {config['epochs']['fine_tune']} epoch(s) of fine-tuning "
              f"from `{settings.get('unfreeze_from')}` at learning rate {_fine_tune_rate(settings)}; the saved "
              f"model is the {config['saved']['phase']} phase's "
              f"best epoch on the validation objective.",
              f"- **Loss weighting:** {config['weighting']['method']}; sample balance: {_balance(settings)}; "
              f"fine-tuning augmentation: {settings.get('augment', 'standard')}; seed {config['seed']}; trained "
              f"{config.get('finished', 'n/a')}.",
              "- **Versions:** " + ", ".join(f"{k} {v}" for k, v in config.get("versions", {}).items()) + ".", ""]
    lines += ["## Intended use", "",
              "- **Intended:** research on, and prototypes of, decision support that names the organ or tissue of "
              "a medical image and whether it shows a benign or malignant finding, from one image.",
              "- **Not intended:** clinical decisions without prospective validation on the site's own images, "
              "scanners and staining; images of organs, modalities or magnifications absent from the training data "
              "below (the out-of-distribution check flags many of them, not all); any use as the only reader.", ""]
    lines += _training_data(run, split, settings, audit, synthetic)
    lines += _taxonomy(run)
    lines += _metrics(metrics, calibration)
    lines += _limitations(run, metrics, split, synthetic)
    return "\n".join(lines) + "\n"


def _balance(settings: dict[str, Any]) -> str:
    """The run's --balance mode (settings.balance_mode reads an older config.json's true/false)."""
    return str(balance_mode(settings.get("balance", "none")))


def _fine_tune_rate(settings: dict[str, Any]) -> str:
    """The fine-tuning rate as the run used it: a number, and how it moved over the phase unless it stayed constant
    (a config.json from before --fine-tune-schedule has no key: constant)."""
    rate = saved_fine_tune_rate(settings)
    if rate is None:
        return "n/a"
    return f"{rate:g}" + (", cosine-decayed to 0" if settings.get("fine_tune_schedule") == "cosine" else "")


def _training_data(run: RunInfo, split: pd.DataFrame, settings: dict, audit: dict | None, synthetic: bool) -> list:
    counts = pd.crosstab(split["subclass"], split["split"]).reindex(columns=["train", "val", "test"], fill_value=0)
    lines = ["## Training data", "",
             f"- **Root:** `{data_root(settings, split)}`"
             + (" (**SYNTHETIC** demo images: these numbers say nothing about medical images)" if synthetic else "")
             + (f"; the split was read from `{settings['split_file']}`" if settings.get("split_file") else ""),
             f"- **Split:** `{split['split_method'].iloc[0] if 'split_method' in split else 'given'}`, "
             f"{len(split)} images: " + ", ".join(f"{k} {int(v)}" for k, v in counts.sum().items()) + "."]
    if audit is not None:
        pairs = audit.get("cross_split_pairs", {})
        lines.append("- **Leakage audit** (`multitask audit-split`): " + ", ".join(f"{k} {v}" for k, v in
                                                                                  pairs.items())
                     + " near-duplicate pairs across splits.")
    else:
        lines.append(f"- **Leakage audit:** not run: `multitask audit-split {run.split_path}` counts near-duplicate "
                     "pairs across train/val/test, and this card shows its result once it has run.")
    rows = [[subclass, *map(int, row)] for subclass, row in counts.iterrows()]
    return lines + ["", *_markdown(rows, ["subclass", "train", "val", "test"]), ""]


def _taxonomy(run: RunInfo) -> list:
    table = run.taxonomy.table
    notes = table[table["note"] != ""]
    lines = ["## Labels", "", f"- **Taxonomy:** `{run.config.get('taxonomy_source', 'default')}`, "
             f"{len(table)} subclasses mapped to {len(run.labels.get('organ', []))} organs and Benign/Malignant."]
    lines += [f"- `{row.subclass}` -> {row.organ} / {row.cancer}: {row.note}" for row in notes.itertuples()]
    return lines + [""]


def _metrics(metrics: dict[str, Any], calibration: dict[str, Any]) -> list:
    lines = ["## Metrics", "", f"Evaluated on {metrics['n_images']} images: {_where(metrics)}.{tta_sentence(metrics)} "
             "Values with 95% bootstrap intervals (stratified by true class).", ""]
    rows = []
    for task in metrics["tasks"]:
        rows += [[task, HEADLINE[k], with_interval(metrics[task], k)] for k in HEADLINE
                 if metrics[task].get(k) is not None]
    lines += _markdown(rows, ["head", "metric", "value"])
    if "cancer" in metrics:
        cancer = metrics["cancer"]
        lines += ["", f"- **Operating point:** Malignant when calibrated P(Malignant) >= {cancer['threshold']:.3f}, "
                      f"chosen on the validation split for a target sensitivity of "
                      f"{calibration.get('target_sensitivity', 'n/a')} ({cancer['threshold_source']})."]
        note = organ_thresholds_note(cancer)
        lines += [f"- **Per-organ operating points:** {note}."] if note else []
        weak = below_target_note(cancer)
        lines += [f"- **Below the target sensitivity:** {weak}."] if weak else []
    temperatures = calibration.get("temperatures", {})
    if temperatures:
        lines.append("- **Calibration:** temperature scaling per head on the validation split (" +
                     ", ".join(f"{t} T={v:.3f}" for t, v in temperatures.items()) + ")."
                     + "".join(f" The {t} head is {note}." for t, note in calibration.get("notes", {}).items()))
    if "ood" in metrics:
        lines.append(f"- **Out-of-distribution rate** on these images: {with_interval(metrics['ood'], 'fraction')}.")
    return lines + [""]


def _limitations(run: RunInfo, metrics: dict[str, Any], split: pd.DataFrame, synthetic: bool) -> list:
    trained = set(split.loc[split["split"] == "train", "organ"])
    absent_training = [o for o in run.labels.get("organ", []) if o not in trained]
    evaluated = set(metrics.get("organ", {}).get("per_class", {}))
    absent_eval = [label for label, v in metrics.get("organ", {}).get("per_class", {}).items() if not v["support"]]
    lines = ["## Known limitations", ""]
    if synthetic:
        lines.append("- Trained and evaluated on SYNTHETIC images: not evidence of any medical performance.")
    if absent_training:
        lines.append(f"- No training images of: {', '.join(absent_training)}; the model cannot know them.")
    if absent_eval and evaluated:
        lines.append(f"- Not evaluated on: {', '.join(absent_eval)} (no such images in the evaluated set).")
    notes = run.taxonomy.table[run.taxonomy.table["note"] != ""]
    if len(notes):
        lines.append("- Labelling choices: " + "; ".join(f"{r.subclass} counts as {r.cancer} ({r.note})"
                                                        for r in notes.itertuples()) + ".")
    note = overlap_note(metrics.get("overlap"))
    if note:
        lines.append(f"- {note}.")
    weak = metrics.get("cancer", {}).get("organs_below_target")
    if weak:
        lines.append(f"- Cancer sensitivity is below the target in: {', '.join(weak)} (see Metrics).")
    lines.append("- Small evaluation sets give wide intervals: read the intervals, not the point values.")
    return lines + [""]
