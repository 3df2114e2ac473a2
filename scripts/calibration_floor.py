"""How low can a run's test ECE go? Each head's test-split ECE (15 bins) under several calibrators, and the ECE a
perfectly calibrated model would show on the same number of test images.

    PYTHONPATH=. python scripts/calibration_floor.py RUN [--draws 2000]

Per head it prints the test ECE of: the raw probabilities; the run's temperature (fitted on validation, what
``multitask evaluate`` reports); and two ORACLES fitted on the test split itself, a temperature and (binary heads)
Platt scaling ``sigmoid(a * logit + b)``. No monotone one- or two-parameter calibrator can beat its oracle on that
split. The floor: labels drawn from the calibrated probabilities themselves (so the model is perfectly calibrated
by construction), ECE measured ``--draws`` times: median, 5-95% range, and how often it is <= 0.05.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from scipy.optimize import minimize  # noqa: E402
from scipy.special import expit, softmax  # noqa: E402

from multitask.calibration import expected_calibration_error, fit_temperature  # noqa: E402
from multitask.export import load_images  # noqa: E402
from multitask.predict import Predictor  # noqa: E402
from multitask.rundir import open_run  # noqa: E402
from multitask.splits import load_split  # noqa: E402

BAR = 0.05


def raw_log_probs(info, split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Uncalibrated log-probabilities per head, and the true class ids, of the run's ``split`` images."""
    manifest = load_split(info.split_path, taxonomy=info.taxonomy)
    rows = manifest[manifest["split"] == split]
    probs = Predictor.from_run(info, calibrated=False).predict_arrays(load_images(rows["path"].tolist(),
                                                                                  info.image_size))
    labels = {t: rows[f"{t}_id"].to_numpy() for t in info.tasks}
    return {t: np.log(np.clip(probs[t], 1e-12, 1.0)) for t in info.tasks}, labels


def platt(log_probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(a, b) of sigmoid(a * z + b), z = log-odds of class 1, minimising the NLL."""
    z = log_probs[:, 1] - log_probs[:, 0]

    def nll(ab):
        q = np.clip(expit(ab[0] * z + ab[1]), 1e-12, 1 - 1e-12)
        return -np.mean(labels * np.log(q) + (1 - labels) * np.log(1 - q))

    return tuple(minimize(nll, [1.0, 0.0]).x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--draws", type=int, default=2000)
    args = parser.parse_args()
    info = open_run(args.run)
    test, test_labels = raw_log_probs(info, "test")
    rng = np.random.default_rng(0)
    for task in info.tasks:
        y, logp = test_labels[task], test[task]
        ece = {"raw": expected_calibration_error(softmax(logp, axis=1), y)}
        temperature = info.temperatures.get(task, 1.0)
        calibrated = softmax(logp / temperature, axis=1)
        ece[f"run's temperature {temperature:.3f} (validation)"] = expected_calibration_error(calibrated, y)
        oracle_t = fit_temperature(logp, y)
        ece[f"oracle temperature {oracle_t:.3f} (fitted on test)"] = expected_calibration_error(
            softmax(logp / oracle_t, axis=1), y)
        if logp.shape[1] == 2:
            a, b = platt(logp, y)
            q = expit(a * (logp[:, 1] - logp[:, 0]) + b)
            ece[f"oracle Platt a={a:.3f} b={b:.3f} (fitted on test)"] = expected_calibration_error(
                np.stack([1 - q, q], axis=1), y)
        draws = np.array([expected_calibration_error(
            calibrated, np.array([rng.choice(len(p), p=p) for p in calibrated])) for _ in range(args.draws)])
        print(f"\n{task}: {len(y)} test images")
        for name, value in ece.items():
            print(f"  test ECE {value:.3f}  {name}")
        lo, hi = np.quantile(draws, [0.05, 0.95])
        print(f"  a perfectly calibrated model on {len(y)} images: ECE median {np.median(draws):.3f} "
              f"(5-95% {lo:.3f}-{hi:.3f}); <= {BAR} in {np.mean(draws <= BAR):.0%} of {args.draws} draws")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
