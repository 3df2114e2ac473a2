"""Audit any split for leakage: near-duplicate images that a split puts on both sides (train-test, ...).

Each image of a later split (val, test) is checked against its ``k`` most similar images of every earlier split,
within its subclass when the table has one, with the same proposal + geometric verification as
:mod:`multitask.grouping`. Works on splits made by any tool (a CSV with ``path`` and ``split``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.errors import DataError
from multitask.files import save_figure, write_json
from multitask.grouping import GroupingResult, Keypoints, nearest, search_space, verify_within_blocks, word_histograms
from multitask.settings import SPLITS, GroupingParams
from multitask.splits import check_split_table, read_split_csv

log = logging.getLogger(__name__)

def cross_split_counts(pairs: np.ndarray, split: Sequence[str]) -> dict[str, int]:
    """Number of ``pairs`` (row positions) whose two rows lie in different splits, per split pair ("train-test")."""
    split = np.asarray(split, dtype=object)
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    names = _split_names(split)
    counts = {f"{x}-{y}": 0 for i, x in enumerate(names) for y in names[i + 1:]}
    for a, b in pairs:
        x, y = sorted((split[a], split[b]), key=names.index)
        if x != y:
            counts[f"{x}-{y}"] += 1
    return counts


def count_cross_split_pairs(result: GroupingResult, split: Sequence[str]) -> dict[str, int]:
    """Verified sibling pairs of ``result`` that a split (one name per manifest row) puts on both sides."""
    return cross_split_counts(result.sibling_pairs[["a", "b"]].to_numpy(), split)


def _split_names(split: Iterable[str]) -> list[str]:
    present = set(split)
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


@dataclass
class SplitAudit:
    """Near-duplicate pairs that a split puts on both sides, found by proposal + geometric verification."""

    pairs: pd.DataFrame  # path_a, split_a, path_b, split_b, inliers; worst (most inliers) first
    counts: dict[str, int]  # verified cross-split pairs per split pair, e.g. {"train-test": 12}
    leaked: dict[str, int]  # images of a later split with a near-duplicate in an earlier one
    sizes: dict[str, int]  # images per split
    params: GroupingParams
    candidates_checked: int = 0

    def to_json(self, *, examples: int = 20) -> dict:
        """JSON-ready summary with the ``examples`` worst pairs."""
        leaked_fraction = {s: (n / self.sizes[s] if self.sizes.get(s) else 0.0) for s, n in self.leaked.items()}
        return {"sizes": self.sizes, "cross_split_pairs": self.counts, "leaked_images": self.leaked,
                "leaked_fraction": leaked_fraction, "candidates_checked": self.candidates_checked,
                "params": asdict(self.params), "worst": self.pairs.head(examples).to_dict(orient="records")}


def audit_split(frame: pd.DataFrame, *, params: GroupingParams | None = None,
                cache_dir: str | os.PathLike | None = None, workers: int | None = None,
                known: dict[tuple[str, str], int] | None = None) -> SplitAudit:
    """Find near-duplicates across the splits of ``frame`` (``path``, ``split``, optional ``subclass``).

    Each image of a later split (val, test) is checked against its ``k`` most similar images of every earlier
    split (train; train and val), within its subclass when the frame has one. ``known`` (pair -> inliers, see
    :func:`multitask.grouping.verify_within_blocks`) spares verifying pairs checked before with the same settings.
    The grouped split runs this same audit on itself until it finds nothing (:mod:`multitask.splits`).
    """
    missing = [c for c in ("path", "split") if c not in frame.columns]
    if missing:
        raise DataError(f"the split table has no {', '.join(missing)} column(s); expected path and split")
    params = params or GroupingParams()
    paths, split = frame["path"].astype(str).tolist(), frame["split"].astype(str).to_numpy(object)
    names = _split_names(split)
    found = verify_within_blocks(
        frame, lambda keypoints, rows: _cross_split_candidates(keypoints, split[rows], names, params),
        params=params, cache_dir=cache_dir, workers=workers, label="audit of", known=known)
    return _audit_from_pairs(paths, split, names, found.pairs, found.inliers, params)


def _cross_split_candidates(keypoints: Sequence[Keypoints], split: np.ndarray, names: list[str],
                            params: GroupingParams) -> np.ndarray:
    """(m, 2) local pairs (earlier split, later split): each later image with its k nearest earlier ones."""
    if len(keypoints) < 2 or len(names) < 2:
        return np.zeros((0, 2), np.int64)
    vectors = search_space(word_histograms(keypoints, params))
    found = []
    for i, later in enumerate(names[1:], start=1):
        query = np.flatnonzero(split == later)
        index = np.flatnonzero(np.isin(split, names[:i]))
        neighbours = nearest(vectors[index], vectors[query], params.k, same_set=False)
        found.append(np.stack([index[neighbours.ravel()], np.repeat(query, neighbours.shape[1])], axis=1))
    return np.concatenate(found).astype(np.int64)


def _audit_from_pairs(paths: list[str], split: np.ndarray, names: list[str], pairs: np.ndarray,
                      inliers: np.ndarray, params: GroupingParams) -> SplitAudit:
    verified = inliers >= params.min_inliers
    kept, kept_inliers = pairs[verified], inliers[verified]
    table = pd.DataFrame({"path_a": [paths[i] for i in kept[:, 0]], "split_a": split[kept[:, 0]],
                          "path_b": [paths[i] for i in kept[:, 1]], "split_b": split[kept[:, 1]],
                          "inliers": kept_inliers})
    table = table.sort_values(["inliers", "path_b"], ascending=[False, True], kind="stable").reset_index(drop=True)
    leaked = {s: int(len(set(table.loc[table["split_b"] == s, "path_b"]))) for s in names[1:]}
    sizes = {s: int((split == s).sum()) for s in names}
    return SplitAudit(pairs=table, counts=cross_split_counts(kept, split), leaked=leaked, sizes=sizes,
                      params=params, candidates_checked=len(pairs))


def read_split_table(path: str | os.PathLike) -> pd.DataFrame:
    """A split CSV from any tool: needs ``path`` and ``split`` columns; relative paths resolve against its folder.

    Checked as :func:`multitask.splits.check_split_table` does (files present, each file in one split, once).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; pass a CSV with path and split columns")
    frame = check_split_table(read_split_csv(path, dtype=str, keep_default_na=False), source=path,
                              relative_to=path.parent)
    if "subclass" in frame.columns and (frame["subclass"] == "").any():
        frame = frame.drop(columns="subclass")  # partly labelled: compare across the whole set instead
        log.warning("%s: some rows have no subclass; candidates are searched across the whole set", path)
    return frame


def draw_contact_sheet(pairs: pd.DataFrame, path: str | os.PathLike, *, max_pairs: int = 8, side: int = 160) -> Path:
    """PNG of cross-split pairs side by side: the most inliers first, then the weakest accepted (borderline) ones.

    ``pairs`` as in :attr:`SplitAudit.pairs`; the borderline rows are the ones to check by eye when tuning
    ``min_inliers``.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas, safe without a display
    from PIL import Image

    borderline = max_pairs // 4 if len(pairs) > max_pairs else 0
    shown = pd.concat([pairs.head(max_pairs - borderline).assign(kind="worst"),
                       pairs.tail(borderline).assign(kind="borderline")])
    rows = max(len(shown), 1)
    fig = Figure(figsize=(2 * side / 50, rows * side / 50 + 0.4))
    axes = fig.subplots(rows, 2, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    if shown.empty:
        axes[0, 0].text(0, 0.5, "no near-duplicates across splits", fontsize=10)
    for r, row in enumerate(shown.itertuples(index=False)):
        for c, (file, name) in enumerate(((row.path_a, row.split_a), (row.path_b, row.split_b))):
            with Image.open(file) as image:
                axes[r, c].imshow(image.convert("RGB").resize((side, side)))
            note = f"  {row.inliers} inliers" + (" (borderline)" if row.kind == "borderline" else "")
            axes[r, c].set_title(f"{name}: {os.path.basename(file)}" + (note if c else ""), fontsize=7)
    fig.suptitle("near-duplicates across splits", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (rows * side / 50 + 0.4)))
    return save_figure(fig, path)


def write_audit(audit: SplitAudit, out_dir: str | os.PathLike, *, examples: int = 8) -> dict[str, Path]:
    """Write ``audit.json`` (counts, worst pairs) and ``audit_pairs.png`` (contact sheet) into ``out_dir``."""
    out = Path(out_dir)
    report = write_json(audit.to_json(examples=max(examples, 20)), out / "audit.json")
    return {"report": report, "contact_sheet": draw_contact_sheet(audit.pairs, out / "audit_pairs.png",
                                                                  max_pairs=examples)}

