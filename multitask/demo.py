"""The offline demo: synthetic data -> joint training -> evaluation -> predictions, in one call.

It shows that the whole pipeline runs and learns on a machine with no internet and no GPU. The data is
SYNTHETIC (see :mod:`multitask.synthetic`): its numbers say nothing about medical images.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from multitask.settings import DemoConfig
from multitask.synthetic import DEMO_ROOT, generate

log = logging.getLogger(__name__)

PASS_ACCURACY = 0.90  # what the demo must reach on both heads of its synthetic test split
DEMO_IMAGE_SIDE = 128  # the generated files; the model resizes them to DemoConfig.image_size


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


def run_demo(config: DemoConfig | None = None) -> DemoResult:
    """Generate data under ``out/data``, train a joint run in ``out/run``, evaluate it and predict a few images."""
    from multitask.evaluate import evaluate_run
    from multitask.predict import sample_predictions, write_predictions
    from multitask.settings import TrainConfig
    from multitask.train import train

    config = config or DemoConfig()
    start = time.perf_counter()
    out = Path(config.out)
    data_dir = out / "data"
    if not (data_dir / DEMO_ROOT).is_dir():
        log.info("writing synthetic data (%d images per subclass) to %s", config.per_class, data_dir)
        generate(data_dir, per_class=config.per_class, size=DEMO_IMAGE_SIDE, seed=0)
    info = train(TrainConfig(out=str(out / "run"), data=str(data_dir), weights=config.weights,
                             image_size=config.image_size, epochs=config.epochs, patience=config.epochs,
                             learning_rate=config.learning_rate,
                             seed=config.seed, overwrite=True, verbose=config.verbose))
    metrics = evaluate_run(info.path, explain=4)
    predictions = sample_predictions(info, config.n_predict, seed=config.seed)
    predictions_path = write_predictions(predictions, info.path / "demo_predictions.csv")
    return DemoResult(run_dir=info.path, data_dir=data_dir, metrics=metrics, predictions=predictions,
                      predictions_path=predictions_path, seconds=time.perf_counter() - start)
