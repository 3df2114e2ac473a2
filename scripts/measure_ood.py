"""Measure the out-of-distribution detector of a real-sample run: foreign images flagged (per kind), the run's own
test images flagged, and AUROC (test vs foreign), overall and per block.

    PYTHONPATH=. python scripts/measure_ood.py --out /tmp/ood-run          # trains the run first (as tests do)
    PYTHONPATH=. python scripts/measure_ood.py --run /tmp/ood-run/run      # measures an existing run

The run is the one tests/conftest.py's ``real_run`` builds: the real sample's grouped 70/15/15 split (seed 42),
pretrained InceptionV3 weights, frozen, 160 px, default settings. The foreign images are tests/foreign.py's
(generated: scenes, documents, charts, screens, noise, constant, gradients, textures, nature, CT-like phantoms).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from foreign import foreign_images, kind_of  # noqa: E402

REAL_SAMPLE = ROOT.parent.parent / "shared" / "data" / "real-sample"
WEIGHTS = Path.home() / ".cache" / "multitask" / "inception_v3_pretrained_notop.weights.h5"


def train_run(out: Path, data: Path, weights: Path) -> Path:
    from multitask.data import scan
    from multitask.settings import TrainConfig
    from multitask.splits import save_split, split_manifest
    from multitask.train import train

    split = out / "split.csv"
    if not split.is_file():
        save_split(split_manifest(scan(data), seed=42, method="grouped", cache_dir=out / "keypoints"), split)
    config = TrainConfig(out=str(out / "run"), split_file=str(split), weights=str(weights), image_size=160,
                         cache_dir=str(out / "cache"), verbose=0, overwrite=True)
    return train(config).path


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(inside)), np.ones(len(outside))], np.r_[inside, outside]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="an existing real-sample run")
    parser.add_argument("--out", help="train the run into OUT/run first")
    parser.add_argument("--data", default=str(REAL_SAMPLE))
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--per-kind", type=int, default=6)
    args = parser.parse_args()
    if not args.run and not args.out:
        parser.error("give --run or --out")
    import tensorflow as tf

    from multitask.model import model_parts
    from multitask.ood import extract, feature_model
    from multitask.predict import Predictor
    from multitask.rundir import open_run
    from multitask.splits import load_split

    run = Path(args.run) if args.run else train_run(Path(args.out), Path(args.data), Path(args.weights))
    info = open_run(run)
    detector, predictor = info.load_ood(), Predictor.from_run(info)
    split = load_split(info.split_path, taxonomy=info.taxonomy)
    images = foreign_images(args.per_kind)
    names = list(images)
    resized = np.stack([tf.clip_by_value(tf.image.resize(image.astype(np.float32), (info.image_size,) * 2,
                                                         antialias=True), 0.0, 255.0).numpy()
                        for image in images.values()])
    foreign = predictor.predict_images(list(resized), names)
    test = predictor.predict_files(split[split["split"] == "test"]["path"].tolist(), progress=False)
    val = predictor.predict_files(split[split["split"] == "val"]["path"].tolist(), progress=False)
    kinds = foreign["path"].map(kind_of)

    print(f"run {run}: {info.config['ood']['fit_images']} training images, threshold {detector.threshold:.3f}")
    print(f"layers {', '.join(detector.layers)}")
    print(f"foreign flagged: {foreign['ood'].mean():.3f} ({int(foreign['ood'].sum())}/{len(foreign)})")
    for kind, share in foreign.groupby(kinds)["ood"].mean().items():
        print(f"  {kind:10s} {share:.2f}")
    missed = foreign.loc[~foreign["ood"], ["path", "ood_score"]]
    if len(missed):
        print("  missed: " + ", ".join(f"{p} ({s:.1f})" for p, s in missed.itertuples(index=False)))
    print(f"test flagged: {test['ood'].mean():.3f} ({int(test['ood'].sum())}/{len(test)}); "
          f"val flagged: {val['ood'].mean():.3f} ({int(val['ood'].sum())}/{len(val)})")
    print(f"AUROC test vs foreign: {auroc(test['ood_score'].to_numpy(), foreign['ood_score'].to_numpy()):.4f}")

    # each block alone (its standardised distance), on the same images
    model = feature_model(model_parts(info.load_model()).backbone, detector.block_names)
    test_features, _ = extract(model, test["path"].tolist(), image_size=info.image_size, batch_size=32)
    foreign_features = {k: np.asarray(v, np.float64) for k, v in model.predict(resized, verbose=0).items()}
    inside, outside = detector.block_scores(test_features), detector.block_scores(foreign_features)
    for name in detector.block_names:
        print(f"  block {name:8s} AUROC {auroc(inside[name], outside[name]):.4f}")


if __name__ == "__main__":
    main()
