"""Benchmark: how sibling grouping (``multitask.grouping.find_sibling_groups``) scales with the number of images.

Synthetic data with planted siblings (``multitask.synthetic.generate_with_siblings``: 26 subclasses, N sources
each, augmented copies of every source, 256x256 JPEGs) is generated once at the largest size; smaller sizes are
nested subsets of whole sources. Each size is grouped from scratch (no keypoint cache) and timed by phase. The
per-image phases (keypoints, verification) should grow linearly, since every image gets k candidates and never all
pairs; the histogram search is quadratic within a subclass but cheap. The script fits the growth exponent,
projects the time for the full Kaggle set (130,000 images, 26 subclasses of 5,000), reports precision/recall
against the planted truth, prints a table and writes JSON.

    python scripts/benchmark_grouping.py --out artifacts/benchmark_grouping.json          # 2,500..20,000 images
    python scripts/benchmark_grouping.py --sizes 520,1040 --out /tmp/g.json                # a smoke run in ~1 min
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.data import scan
from multitask.grouping import GroupingParams, Keypoints, find_sibling_groups, propose_pairs
from multitask.synthetic import generate_with_siblings
from multitask.taxonomy import load_taxonomy

FULL_DATASET, FULL_PER_SUBCLASS = 130_000, 5_000


def make_data(folder: Path, *, largest: int, siblings: int, size: int) -> pd.DataFrame:
    """Manifest of the synthetic set (reused when ``folder`` already holds it) with a ``source`` column."""
    subclasses = len(load_taxonomy().subclasses)
    sources = int(np.ceil(largest / (subclasses * siblings)))
    truth_file = folder / f"truth_{sources}x{siblings}_{size}px.csv"
    if not truth_file.is_file():
        start = time.perf_counter()
        truth = generate_with_siblings(folder, sources_per_class=sources, siblings_per_source=siblings, size=size)
        pd.Series(truth, name="source").rename_axis("path").reset_index().to_csv(truth_file, index=False)
        print(f"generated {len(truth)} images in {time.perf_counter() - start:.0f} s under {folder}")
    truth = pd.read_csv(truth_file).set_index("path")["source"]
    manifest = scan(folder)
    manifest["source"] = manifest["path"].map(truth)
    return manifest.dropna(subset=["source"]).reset_index(drop=True)


def nested_subset(manifest: pd.DataFrame, n: int) -> pd.DataFrame:
    """About ``n`` images made of whole sources, the same first sources of every subclass."""
    source_rank = manifest["source"].str.rsplit("/s", n=1).str[1].astype(int)
    per_source = manifest.groupby("source").size().iloc[0]
    keep = int(np.ceil(n / (manifest["subclass"].nunique() * per_source)))
    return manifest[source_rank < keep].reset_index(drop=True)


def precision_recall(groups: np.ndarray, source: pd.Series) -> tuple[float, float]:
    """Pairwise precision and recall of ``groups`` against the planted sources (counted, never all pairs)."""
    frame = pd.DataFrame({"group": groups, "source": source.to_numpy()})
    both = _pairs(frame.groupby(["group", "source"]).size())
    return both / max(_pairs(frame.groupby("group").size()), 1), both / max(_pairs(frame.groupby("source").size()), 1)


def _pairs(counts: pd.Series) -> float:
    return float((counts * (counts - 1) / 2).sum())


def run_one(manifest: pd.DataFrame, *, workers: int) -> dict:
    """Group ``manifest`` from scratch and return its timings, counts and quality."""
    start, cpu = time.perf_counter(), time.process_time()
    result = find_sibling_groups(manifest, workers=workers)
    total, cpu = time.perf_counter() - start, time.process_time() - cpu
    precision, recall = precision_recall(result.groups, manifest["source"])
    return {"images": len(manifest), "per_subclass": int(manifest["subclass"].value_counts().max()),
            "seconds": total, "cpu_seconds": cpu, **{f"{k}_s": v for k, v in result.seconds.items()},
            "ms_per_image": 1000 * total / len(manifest),
            "cpu_ms_per_image": 1000 * cpu / len(manifest), "pairs_per_image": len(result.pairs) / len(manifest),
            "precision": precision, "recall": recall, **result.summary()}


def growth_exponent(rows: list[dict], key: str = "seconds") -> float:
    """Slope of log(time) against log(images): 1.0 is linear, 2.0 is all pairs."""
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit(np.log([r["images"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def time_search(per_subclass: int, params: GroupingParams) -> float:
    """Seconds to propose candidates in one subclass of ``per_subclass`` images (random descriptors: same cost)."""
    rng = np.random.default_rng(0)
    fake = [Keypoints(points=(np.zeros((n, 2), np.float32),) * 2,
                      descriptors=(rng.integers(0, 256, (n, 32), dtype=np.uint8),) * 2)
            for n in [params.keypoints] * per_subclass]
    start = time.perf_counter()
    propose_pairs(fake, params)
    return time.perf_counter() - start


def project_full(row: dict, search_per_subclass_s: float) -> dict:
    """Seconds for 130,000 images: keypoints and verification scale with images; the search is measured per
    5,000-image subclass (it is quadratic within a subclass) and summed over 26 subclasses."""
    linear = (row["keypoints_s"] + row["verify_s"]) * FULL_DATASET / row["images"]
    search = search_per_subclass_s * FULL_DATASET / FULL_PER_SUBCLASS
    return {"from_images": row["images"], "linear_phases_s": linear, "search_s": search,
            "search_per_5000_subclass_s": search_per_subclass_s, "total_s": linear + search,
            "total_h": (linear + search) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2500,5000,10000,20000", help="image counts to time")
    parser.add_argument("--siblings", type=int, default=10, help="augmented copies per source (default 10)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="threads (default: all cores)")
    parser.add_argument("--data-dir", help="keep the generated images here and reuse them (default: a temp dir)")
    parser.add_argument("--budget-s", type=float, default=900, help="skip larger sizes once this much has run")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sizes = sorted(int(s) for s in args.sizes.split(","))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data_dir or tmp)
        manifest = make_data(folder, largest=sizes[-1], siblings=args.siblings, size=args.size)
        rows, started, skipped = [], time.perf_counter(), []
        for n in sizes:
            if time.perf_counter() - started > args.budget_s:
                skipped.append(n)
                continue
            rows.append(run_one(nested_subset(manifest, n), workers=args.workers))
            r = rows[-1]
            print(f"{r['images']:>7} images: {r['seconds']:7.1f} s  (keypoints {r['keypoints_s']:.1f}, propose "
                  f"{r['propose_s']:.1f}, verify {r['verify_s']:.1f})  precision {r['precision']:.4f} recall "
                  f"{r['recall']:.4f}", flush=True)

    table = pd.DataFrame(rows)
    columns = ["images", "per_subclass", "seconds", "keypoints_s", "propose_s", "verify_s", "ms_per_image",
               "cpu_ms_per_image", "pairs_per_image", "precision", "recall"]
    print("\n" + table[columns].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    report = {
        "machine": {"cpus": os.cpu_count(), "workers": args.workers, "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},
        "data": {"image_side_px": args.size, "siblings_per_source": args.siblings, "subclasses": 26},
        "params": GroupingParams().__dict__,
        "rows": rows,
        "skipped_sizes": skipped,
        "growth_exponent": {k: growth_exponent(rows, k) for k in ("seconds", "keypoints_s", "verify_s",
                                                                   "propose_s")},
        "projection_130k": project_full(rows[-1], time_search(FULL_PER_SUBCLASS, GroupingParams())) if rows else None,
    }
    print(f"\ngrowth exponent of total time (1 = linear, 2 = all pairs): {report['growth_exponent']['seconds']:.2f}")
    if skipped:
        print(f"skipped (over --budget-s {args.budget_s:.0f}): {skipped}")
    projection = report["projection_130k"]
    print(f"projected for {FULL_DATASET:,} images on {args.workers} worker(s): {projection['total_s']:.0f} s "
          f"({projection['total_h']:.2f} h), of which the candidate search {projection['search_s']:.0f} s "
          f"({projection['search_per_5000_subclass_s']:.1f} s per 5,000-image subclass, measured)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=float))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
