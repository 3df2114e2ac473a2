"""Choose training defaults on real images with a pretrained backbone: a small sweep, judged on VALIDATION.

    python scripts/sweep_defaults.py --data ../shared/data/real-sample \
        --weights "$(../shared/tools/pretrained-weights)" --out artifacts/sweep

Every configuration trains on one saved grouped split (made once, seed 42) with a shared feature cache, and is
scored on the validation split (which defaults win) and on the test split (reported, never used to choose). The
frozen-phase grid covers the learning rate and the early-stopping patience; the fine-tuning grid the block to
unfreeze from. Prints a table and writes ``sweep.csv`` and ``sweep.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pandas as pd  # noqa: E402

from multitask.data import scan  # noqa: E402
from multitask.evaluate import evaluate_run  # noqa: E402
from multitask.settings import TrainConfig  # noqa: E402
from multitask.splits import save_split, split_manifest  # noqa: E402
from multitask.train import train  # noqa: E402


def score(run_dir: Path, split: str, out: Path) -> dict:
    metrics = evaluate_run(run_dir, split=split, out=out / split)
    return {f"{split}_organ_acc": metrics["organ"]["accuracy"],
            f"{split}_cancer_bacc": metrics["cancer"]["balanced_accuracy"],
            f"{split}_cancer_auc": metrics["cancer"]["roc_auc"]}


def run_one(name: str, settings: dict, *, split_file: Path, out: Path, args) -> dict:
    run_dir = out / name
    config = TrainConfig(out=str(run_dir), split_file=str(split_file), weights=args.weights,
                         image_size=args.image_size, cache_dir=str(out / "cache"), seed=args.seed, overwrite=True,
                         verbose=0, **settings)
    info = train(config)
    best = [info.config["best"][phase] for phase in ("heads", "fine_tune") if info.config["best"][phase] is not None]
    row = {"name": name, **settings, "best_val_task_loss": min(best),
           "saved": f"{info.config['saved']['phase']}@{info.config['saved']['epoch']}",
           "seconds": sum(info.config["timings"].values())}
    for split in ("val", "test"):
        row.update(score(run_dir, split, out / "eval" / name))
    print(pd.Series(row).to_string(), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", default="artifacts/sweep")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning-rates", default="1e-4,3e-4,1e-3")
    parser.add_argument("--patience", default="3,5,10")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--unfreeze-from", default="mixed9,mixed8,mixed7")
    parser.add_argument("--fine-tune-epochs", type=int, default=3)
    parser.add_argument("--fine-tune-base", default="", help="learning_rate,patience of the fine-tuning grid "
                                                               "(default: the best frozen configuration)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    split_file = out / "split.csv"
    if not split_file.is_file():
        save_split(split_manifest(scan(args.data), seed=args.seed, cache_dir=out / "cache" / "keypoints"), split_file)

    rows = []
    for lr, patience in itertools.product(map(float, args.learning_rates.split(",")),
                                          map(int, args.patience.split(","))):
        rows.append(run_one(f"frozen-lr{lr:g}-p{patience}", {"learning_rate": lr, "patience": patience,
                                                             "epochs": args.epochs},
                            split_file=split_file, out=out, args=args))
    frozen = pd.DataFrame(rows)
    best = frozen.sort_values("best_val_task_loss").iloc[0]
    lr, patience = ((float(v) for v in args.fine_tune_base.split(",")) if args.fine_tune_base
                    else (best["learning_rate"], best["patience"]))
    for block in filter(None, args.unfreeze_from.split(",")):
        rows.append(run_one(f"tuned-{block}", {"learning_rate": lr, "patience": int(patience), "epochs": args.epochs,
                                              "fine_tune_epochs": args.fine_tune_epochs, "unfreeze_from": block},
                            split_file=split_file, out=out, args=args))
    table = pd.DataFrame(rows)
    table.to_csv(out / "sweep.csv", index=False)
    (out / "sweep.json").write_text(json.dumps(rows, indent=2, default=str))
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
