"""What flip test-time augmentation (``--tta``) costs: seconds per image of ``Predictor.predict_files`` with and without
it, on the same images and run, and how many answers it changes.

    multitask scan ../shared/data/real-sample --out /tmp/split.csv
    multitask train --split-file /tmp/split.csv --weights "$(../shared/tools/pretrained-weights)" --image-size 160 \
        --fine-tune-epochs 0 --out /tmp/run160
    python scripts/tta_timing.py /tmp/run160 --images 64 --out /tmp/tta-timing.json

The images are the first ``--images`` of the run's test split, then its val split (never train). Three ways are
timed, alternating ``--repeats`` times so that a machine others share slows each alike, after one untimed warm-up
call each (tracing): ``plain`` (no TTA), ``tta`` (:class:`multitask.engines.FlipAveraged`: one forward pass of
the 2n batch, what ``--tta`` does) and ``tta_two_passes`` (the same average from two passes of n, the alternative
it was chosen over). Wall seconds include reading and decoding the files, as ``multitask predict`` pays them;
``cpu`` are this process's CPU seconds (all its threads). On a machine others share, a repeat's wall time can
double when another process takes a core, so the summary is the FASTEST repeat's wall time and the median CPU
time; the JSON holds every repeat. The last line states the cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from multitask.engines import Engine, FlipAveraged  # noqa: E402
from multitask.predict import Predictor  # noqa: E402
from multitask.rundir import open_run  # noqa: E402
from multitask.splits import load_split  # noqa: E402
from multitask.taxonomy import TASKS  # noqa: E402


class TwoPasses(Engine):
    """FlipAveraged's arithmetic in two calls of n images (the originals, then the mirrors): for comparison only."""

    def __init__(self, engine: Engine):
        self.engine, self.name = engine, f"{engine.name}+flip2"
        self.image_size, self.output_names = engine.image_size, engine.output_names

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.asarray(images, np.float32)
        plain, mirrored = self.engine(images), self.engine(images[:, :, ::-1, :])
        return {name: (plain[name] + mirrored[name]) / 2 if name in TASKS else plain[name] for name in plain}


def timed(predictor: Predictor, files: list[str], batch_size: int) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    frame = predictor.predict_files(files, batch_size=batch_size, progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu, frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the measurements here as JSON")
    args = parser.parse_args()

    info = open_run(args.run_dir)
    split = load_split(info.split_path, taxonomy=info.taxonomy)
    files = held_out_files(split, args.images)
    plain = Predictor.from_run(info)
    ways = {"plain": plain, "tta": Predictor.from_run(info, tta=True),
            "tta_two_passes": Predictor.from_run(info)}
    ways["tta_two_passes"].engine = TwoPasses(plain.engine)
    assert isinstance(ways["tta"].engine, FlipAveraged)
    for predictor in ways.values():  # warm-up: tracing, first-call allocations
        predictor.predict_files(files[: args.batch_size], batch_size=args.batch_size, progress=False)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    frames = {}
    for repeat in range(args.repeats):
        order = list(ways) if repeat % 2 == 0 else list(reversed(ways))
        for name in order:
            wall, cpu, frames[name] = timed(ways[name], files, args.batch_size)
            runs[name].append({"wall_s": wall, "cpu_s": cpu})
    per_image = {name: {"wall_ms": 1000 * min(r["wall_s"] for r in rows) / len(files),
                        "cpu_ms": 1000 * statistics.median(r["cpu_s"] for r in rows) / len(files)}
                 for name, rows in runs.items()}
    changed = {task: int((frames["plain"][task] != frames["tta"][task]).sum()) for task in info.tasks}
    result = {"run": str(info.path), "image_size": info.image_size, "images": len(files),
              "batch_size": args.batch_size, "repeats": args.repeats, "cpus": os.cpu_count(),
              "machine": platform.platform(), "per_image": per_image, "runs": runs,
              "answers_changed_by_tta": changed}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(per_image, indent=2))
    ratio = per_image["tta"]["wall_ms"] / per_image["plain"]["wall_ms"]
    print(f"{len(files)} images at {info.image_size} px on {os.cpu_count()} CPU(s): "
          f"{per_image['plain']['wall_ms']:.1f} ms/image without TTA, {per_image['tta']['wall_ms']:.1f} with it "
          f"({ratio:.2f}x; two passes of n: {per_image['tta_two_passes']['wall_ms']:.1f}); CPU ms/image "
          f"{per_image['plain']['cpu_ms']:.1f} / {per_image['tta']['cpu_ms']:.1f} / "
          f"{per_image['tta_two_passes']['cpu_ms']:.1f}; answers changed: "
          + ", ".join(f"{task} {n}/{len(files)}" for task, n in changed.items()))


def held_out_files(split, n: int) -> list[str]:
    """The first ``n`` test images, then val images: never the ones the run was trained on."""
    rows = [split.loc[split["split"] == name, "path"].tolist() for name in ("test", "val")]
    return (rows[0] + rows[1])[:n]


if __name__ == "__main__":
    main()
