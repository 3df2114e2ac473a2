"""The offline demo: synthetic data -> joint training -> evaluation -> predictions, in one call.

It shows that the whole pipeline runs and learns on a machine with no internet and no GPU. The data is
SYNTHETIC (see :mod:`multitask.synthetic`): its numbers say nothing about medical images.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multitask.synthetic import DEMO_ROOT, generate

log = logging.getLogger(__name__)

PASS_ACCURACY = 0.90  # what the demo must reach on both heads of its synthetic test split


@dataclass
class DemoResult:
    run_dir: Path
    data_dir: Path
    metrics: dict
    predictions: pd.DataFrame
    predictions_path: Path
    seconds: float

    @property
    def passed(self) -> bool:
        return all(self.metrics[t]["accuracy"] >= PASS_ACCURACY for t in self.metrics["tasks"])


def run_demo(
    out: str | os.PathLike = "artifacts/demo",
    *,
    weights: str | None = None,
    per_class: int = 30,
    image_size: int = 96,
    epochs: int = 15,
    n_predict: int = 8,
    seed: int = 42,
    verbose: int = 1,
) -> DemoResult:
    """Generate data under ``out/data``, train a joint run in ``out/run``, evaluate it and predict a few images."""
    from multitask.data import load_split
    from multitask.evaluate import evaluate_run
    from multitask.predict import Predictor, write_predictions
    from multitask.train import TrainConfig, train

    start = time.perf_counter()
    out = Path(out)
    data_dir = out / "data"
    if not (data_dir / DEMO_ROOT).is_dir():
        log.info("writing synthetic data (%d images per subclass) to %s", per_class, data_dir)
        generate(data_dir, per_class=per_class, size=128, seed=0)
    config = TrainConfig(out=str(out / "run"), data=str(data_dir), weights=weights, image_size=image_size,
                         epochs=epochs, patience=epochs, seed=seed, overwrite=True, verbose=verbose)
    info = train(config)
    metrics = evaluate_run(info.path, explain=4)
    test = load_split(info.split_path)
    test = test[test["split"] == "test"]
    sample = test.sample(n=min(n_predict, len(test)), random_state=seed)
    predictions = Predictor.from_run(info).predict_files(sample["path"].tolist(), progress=False)
    for task in info.tasks:
        predictions.insert(predictions.columns.get_loc(task), f"true_{task}", sample[task].to_numpy())
    predictions_path = write_predictions(predictions, info.path / "demo_predictions.csv")
    return DemoResult(run_dir=info.path, data_dir=data_dir, metrics=metrics, predictions=predictions,
                      predictions_path=predictions_path, seconds=time.perf_counter() - start)
