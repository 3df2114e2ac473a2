"""Does the decoded-image cache pay on this machine? Feature extraction and one fine-tuning epoch, from the files and
from the cache, timed in one process on the same images and model.

    W=$(../shared/tools/pretrained-weights)
    python scripts/decoded_cache_timing.py --data ../shared/data/real-sample --weights "$W" --image-size 160 \
        --out /tmp/decoded-timing.json

For each way of reading (``files``: decode every JPEG each time, as ``--decoded-cache off`` does; ``cache``: decode
once into ``multitask.decoded``'s uint8 array file, then read it, as ``--decoded-cache on`` does) it times:

1. ``decode``: building the decoded cache (cache only; paid once per image size, then reused by later runs);
2. ``features``: pooled features of the train and val images (phase 1 of ``multitask train``);
3. ``fine_tune_epoch``: one epoch of the project's fine-tuning (unfrozen from mixed7, BatchNorm frozen, both heads,
   static loss weights, keras-cv augmentation) over the train images, after two untimed warm-up steps.

Each is wall seconds, and ``*_cpu`` the CPU seconds this process used (all its threads: on a machine that others
share, the work done is steadier than the wall time). The two ways alternate ``--repeats`` times (files first, then
cache first, ...), so a machine that others share slows both alike; the JSON holds every repeat and the medians.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="dataset folder")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="write the numbers here as JSON")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import keras
    import numpy as np
    import tensorflow as tf

    from multitask.augment import make_augmenter
    from multitask.data import make_dataset, scan, task_labels
    from multitask.decoded import decoded_dataset, decoded_images
    from multitask.features import extract_features
    from multitask.model import build_model, freeze_backbone, model_parts
    from multitask.splits import split_manifest
    from multitask.weighting import MultiTaskTrainer, make_weighting

    split = split_manifest(scan(args.data), seed=42, method="random")
    fit_rows = split[split["split"].isin(["train", "val"])].sort_values("split", kind="stable").reset_index(drop=True)
    paths = fit_rows["path"].tolist()
    train_positions = np.flatnonzero(fit_rows["split"].to_numpy() == "train")
    train_rows = fit_rows.iloc[train_positions].reset_index(drop=True)
    size, batch = args.image_size, args.batch_size
    keras.utils.set_random_seed(0)
    model = build_model(image_size=size, weights=args.weights)
    parts = model_parts(model)
    freeze_backbone(parts.backbone, unfreeze_from="mixed7")
    weighting = make_weighting("static", tasks=parts.tasks, loss_weights={})
    trainer = MultiTaskTrainer(model, weighting)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-5))
    start_weights = [np.array(w) for w in model.weights]

    def epoch_seconds(dataset) -> tuple[float, float]:
        for variable, value in zip(model.weights, start_weights, strict=True):
            variable.assign(value)
        trainer.fit(dataset.take(2), epochs=1, verbose=0)  # warm-up: traces the step (kept for the next fit)
        begin, cpu = time.perf_counter(), time.process_time()
        trainer.fit(dataset, epochs=1, verbose=0)
        return time.perf_counter() - begin, time.process_time() - cpu

    labels = task_labels(train_rows, "joint")
    runs: dict[str, list[dict[str, float]]] = {"files": [], "cache": []}
    for repeat in range(args.repeats):
        for way in ("files", "cache") if repeat % 2 == 0 else ("cache", "files"):
            row: dict[str, float] = {}
            with tempfile.TemporaryDirectory(prefix="decoded-timing-") as cache_dir:
                decoded = None
                if way == "cache":
                    begin, cpu = time.perf_counter(), time.process_time()
                    decoded = decoded_images(paths, image_size=size, cache_dir=cache_dir, verbose=0)
                    row["decode"], row["decode_cpu"] = time.perf_counter() - begin, time.process_time() - cpu
                begin, cpu = time.perf_counter(), time.process_time()
                extract_features(parts.backbone, paths, image_size=size, batch_size=batch, verbose=0, decoded=decoded)
                row["features"], row["features_cpu"] = time.perf_counter() - begin, time.process_time() - cpu
                augment = make_augmenter(0)
                if decoded is None:
                    dataset = make_dataset(train_rows, image_size=size, batch_size=batch, training=True, seed=0,
                                           augment=augment, known_length=True)
                else:
                    dataset = decoded_dataset(decoded, train_positions, labels, batch_size=batch, training=True,
                                              seed=0, augment=augment)
                row["fine_tune_epoch"], row["fine_tune_epoch_cpu"] = epoch_seconds(dataset)
                del decoded, dataset
            runs[way].append({k: round(v, 2) for k, v in row.items()})
            print(way, runs[way][-1], flush=True)

    medians = {way: {k: round(statistics.median(r[k] for r in rows), 2) for k in rows[0]}
               for way, rows in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "tensorflow": tf.__version__, "images": len(paths),
              "train_images": len(train_positions), "image_size": size, "batch_size": batch, "runs": runs,
              "medians": medians}
    print(json.dumps(medians, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
