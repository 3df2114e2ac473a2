"""What the page says about the served run beside its answers, read once from the run's own files.

- the operating point: the malignancy threshold, the target sensitivity it was chosen for on the validation split
  and what it reached there (``config.json``'s ``calibration``), and per-organ thresholds where the run has them;
- the organs the run never saw in training: the organ head still has a class for them (the taxonomy's), but no
  training image taught it one (the train rows of the run's ``split.csv``), so an answer naming one is a guess.

Every field is optional: a run without validation images has no sensitivity, a Predictor served without its run
folder has no counts; the page shows what there is.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger(__name__)


def run_facts(run: str | os.PathLike | None, predictor) -> dict[str, Any]:
    """``{"operating_point": {...} | None, "train_organs": {organ: images} | None, "unseen_organs": [...] | None,
    "ood_detector": bool}`` for ``predictor``, serving ``run`` (None: only what the predictor knows)."""
    facts: dict[str, Any] = {"operating_point": None, "train_organs": None, "unseen_organs": None,
                             "ood_detector": getattr(predictor, "ood_threshold", None) is not None}
    if "cancer" in predictor.tasks:
        facts["operating_point"] = {"malignancy_threshold": _number(predictor.threshold),
                                    "threshold_source": getattr(predictor, "threshold_source", None)}
    if run is None:
        return facts
    from multitask.rundir import open_run

    info = open_run(run)
    if facts["operating_point"] is not None and facts["operating_point"]["threshold_source"] != "given":
        facts["operating_point"].update(_chosen_on_validation(info.calibration))
    if "organ" in predictor.tasks:
        counts = _train_organ_counts(info)
        if counts is not None:
            facts["train_organs"] = {organ: counts.get(organ, 0) for organ in predictor.labels["organ"]}
            facts["unseen_organs"] = [organ for organ, n in facts["train_organs"].items() if n == 0]
    return facts


def _chosen_on_validation(calibration: dict[str, Any]) -> dict[str, Any]:
    """How the run's threshold was chosen and what it reached on the validation split; per-organ ones if any."""
    validation = calibration.get("validation") or {}
    chosen = {"target_sensitivity": _number(calibration.get("target_sensitivity")),
              "validation_images": validation.get("images"),
              "validation_sensitivity": _number(validation.get("sensitivity")),
              "validation_specificity": _number(validation.get("specificity"))}
    per_organ = calibration.get("malignancy_thresholds")
    if isinstance(per_organ, dict):
        chosen["organ_thresholds"] = {
            organ: {key: _number(value) if isinstance(value, (int, float)) else value for key, value in row.items()}
            for organ, row in per_organ.items() if isinstance(row, dict)}
    return chosen


def _train_organ_counts(info) -> dict[str, int] | None:
    """Training images per organ, from the run's split (None when it cannot be read: the page then says nothing)."""
    from multitask.splits import load_split

    try:
        split = load_split(info.split_path, taxonomy=info.taxonomy, check_files=False)
    except Exception as exc:  # the server still serves; the page just cannot list what the run never saw
        log.warning("cannot count the training images per organ of %s: %s", info.path, exc)
        return None
    return {str(organ): int(n) for organ, n in split.loc[split["split"] == "train", "organ"].value_counts().items()}


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
