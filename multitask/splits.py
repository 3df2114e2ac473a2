"""Manifest -> split: stratified, leakage-aware train/val/test splits, and the split CSV (save, load, check).

A split is the manifest (:mod:`multitask.data`) with a ``split`` column. The grouped method keeps augmented
siblings of one source image (:mod:`multitask.grouping`) in one split; a split CSV is refused when it lists a
file twice or a file that is missing, naming the rows, because either silently trains on test images.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.data import MANIFEST_COLUMNS, label_paths
from multitask.errors import ConfigError, DataError
from multitask.files import write_csv
from multitask.filesystem import first_few, is_regular_file, resolved_paths
from multitask.settings import DEFAULT_FRACTIONS, DEFAULT_SPLIT_METHOD, SPLIT_METHODS, SPLITS, check_fractions
from multitask.taxonomy import Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

MAX_AUDIT_ROUNDS = 20  # the grouped split's self-audit; each round joins groups, and one or two rounds are usual



def split_manifest(
    manifest: pd.DataFrame,
    *,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = 42,
    method: str = DEFAULT_SPLIT_METHOD,
    groups: Sequence[int] | np.ndarray | None = None,
    min_inliers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> pd.DataFrame:
    """Copy of ``manifest`` with a ``split`` column: stratified by subclass, deterministic for ``seed``.

    ``method="grouped"`` (the default, leakage-aware) first finds the augmented siblings of each source image
    (:func:`multitask.grouping.find_sibling_groups`, or the ``groups`` given, one id per row) and puts each group
    whole into one split; it adds ``group``, ``split_method`` and ``split_min_inliers`` columns.
    ``method="random"`` splits files independently (siblings leak across splits) and adds ``split_method``.

    Subclasses with fewer than 3 images cannot be spread over three splits; they go to train (with a warning).
    """
    if method not in SPLIT_METHODS:
        raise ConfigError(f"unknown split method {method!r}; expected one of {', '.join(SPLIT_METHODS)}")
    fractions = check_fractions(fractions)
    if method == "random":
        out = _random_split(manifest, fractions=fractions, seed=seed)
        out["split_method"] = "random"
        return out
    out = manifest.copy()
    if groups is None:
        from multitask.settings import GroupingParams

        min_inliers = GroupingParams.min_inliers if min_inliers is None else min_inliers
        groups, split = _audited_grouped_split(manifest, params=GroupingParams(min_inliers=min_inliers),
                                               fractions=fractions, seed=seed, cache_dir=cache_dir, workers=workers)
    else:
        groups = np.asarray(groups)
        if len(groups) != len(out) or pd.isna(groups).any():
            raise DataError(f"got {len(groups)} group ids ({int(pd.isna(groups).sum())} missing) for {len(out)} "
                            "manifest rows; give one id per row")
        split = _split_groups(out["subclass"].to_numpy(object), groups, fractions=fractions, seed=seed)
    out["split"] = split
    out["group"] = pd.factorize(groups)[0]
    out["split_method"] = "grouped"
    if min_inliers is not None:
        out["split_min_inliers"] = int(min_inliers)
    return out


def _audited_grouped_split(manifest: pd.DataFrame, *, params, fractions: tuple[float, float, float], seed: int,
                           cache_dir: str | os.PathLike | None, workers: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sibling groups and their split, which ``multitask audit-split`` with the same settings finds clean.

    The grouping proposes each image's ``k`` most similar images of its whole subclass; the audit, each val/test
    image's ``k`` most similar images of the earlier splits only. A pair can miss the first and make the second:
    lung_bnt_0020/0021 of the real sample rank 9th and 10th among their 40 lung_bnt images (k = 8), but 0021 is
    among 0020's 8 nearest train images once the split is made. So the split is audited with the audit's own code
    (:func:`multitask.audit.audit_split`); a sibling pair it finds across splits joins its two groups and the groups
    are split again, until the audit finds none. Each round joins groups, so this ends; pairs verified once (by the
    grouping or an earlier round) are not verified again.
    """
    from multitask.audit import audit_split
    from multitask.grouping import connected_groups, find_sibling_groups

    result = find_sibling_groups(manifest, params=params, cache_dir=cache_dir, workers=workers)
    known = result.known_inliers()
    links = result.sibling_pairs[["a", "b"]].to_numpy(np.int64).reshape(-1, 2)
    groups, subclass = result.groups, manifest["subclass"].to_numpy(object)
    row_of = {path: row for row, path in enumerate(manifest["path"].astype(str))}
    for attempt in range(1, MAX_AUDIT_ROUNDS + 1):
        split = _split_groups(subclass, groups, fractions=fractions, seed=seed)
        audit = audit_split(manifest.assign(split=split), params=params, cache_dir=cache_dir, workers=workers,
                            known=known)
        if audit.pairs.empty:
            return groups, split
        found = np.array([[row_of[a], row_of[b]] for a, b in zip(audit.pairs["path_a"], audit.pairs["path_b"],
                                                                      strict=True)], np.int64)
        log.info("audit of the grouped split, round %d: %d sibling pair(s) across splits that the grouping's "
                 "candidates missed (e.g. %s and %s); joining their groups and splitting again", attempt, len(found),
                 audit.pairs["path_a"].iloc[0], audit.pairs["path_b"].iloc[0])
        links = np.concatenate([links, found])
        groups = connected_groups(len(manifest), links)
    log.warning("the grouped split still has sibling pairs across splits after %d audit rounds; check it with "
                "`multitask audit-split`", MAX_AUDIT_ROUNDS)
    return groups, split


def _random_split(manifest: pd.DataFrame, *, fractions: tuple[float, float, float], seed: int) -> pd.DataFrame:
    """Files split independently, stratified by subclass (sklearn ``train_test_split`` twice)."""
    from sklearn.model_selection import train_test_split

    train_f, val_f, test_f = fractions
    out = manifest.copy()
    out["split"] = "train"
    tiny = _tiny_subclasses(out)
    pool = out.index[~out["subclass"].isin(tiny)]
    if len(pool) == 0 or (val_f == 0 and test_f == 0):
        return out
    strata = out.loc[pool, "subclass"]
    held_out = val_f + test_f
    try:
        _, rest = train_test_split(pool, test_size=held_out, stratify=strata, random_state=seed)
        if val_f == 0 or test_f == 0:
            out.loc[rest, "split"] = "val" if val_f else "test"
            return out
        val, test = train_test_split(
            rest, test_size=test_f / held_out, stratify=out.loc[rest, "subclass"], random_state=seed
        )
    except ValueError as exc:  # sklearn: too few images for a stratified split of this size
        raise DataError(
            f"cannot make a stratified {train_f:.2f}/{val_f:.2f}/{test_f:.2f} split of {len(pool)} images in "
            f"{strata.nunique()} subclasses ({exc}); add images or change the fractions"
        ) from exc
    out.loc[val, "split"] = "val"
    out.loc[test, "split"] = "test"
    return out


def _tiny_subclasses(manifest: pd.DataFrame) -> pd.Index:
    """Subclasses with fewer than 3 images (logged): they all go to train."""
    counts = manifest["subclass"].value_counts()
    tiny = counts[counts < 3].index
    if len(tiny):
        log.warning("subclass(es) %s have fewer than 3 images: all go to train", ", ".join(sorted(tiny)))
    return tiny


def _split_groups(subclass: np.ndarray, groups: np.ndarray, *, fractions: tuple[float, float, float],
                  seed: int) -> np.ndarray:
    """Split name per row such that no group spans two splits and each subclass is near its fractions.

    Groups are visited in a seeded random order; each goes whole to the split whose share of the group's
    subclass(es) is furthest below its target, so every split ends within one group's size of its target.
    """
    split = np.full(len(groups), SPLITS[0], dtype=object)
    tiny = np.isin(subclass, list(_tiny_subclasses(pd.DataFrame({"subclass": subclass}))))
    pool = np.flatnonzero(~np.isin(groups, groups[tiny]))  # a group touching a tiny subclass stays in train
    if len(pool) == 0:
        return split
    rng = np.random.default_rng(seed)
    sub_codes, sub_names = pd.factorize(subclass[pool], sort=True)
    group_codes, _ = pd.factorize(groups[pool])
    sizes = np.bincount(sub_codes).astype(float)
    closed = np.asarray(fractions) == 0
    target = _integer_targets(sizes, np.asarray(fractions), rng)
    filled = np.zeros_like(target)
    by_group = np.argsort(group_codes, kind="stable")
    bounds = np.searchsorted(group_codes[by_group], np.arange(group_codes.max() + 2))
    for g in rng.permutation(group_codes.max() + 1):
        rows = by_group[bounds[g]:bounds[g + 1]]
        subs, count = np.unique(sub_codes[rows], return_counts=True)
        deficit = (((target[subs] - filled[subs]) / sizes[subs, None]) * count[:, None]).sum(axis=0)
        deficit[closed] = -np.inf
        choice = int(np.argmax(deficit))
        filled[subs, choice] += count
        split[pool[rows]] = SPLITS[choice]
    for s, name in enumerate(sub_names):
        empty = [SPLITS[k] for k in range(3) if not closed[k] and filled[s, k] == 0]
        if empty:
            log.warning("subclass %s: its %d images form too few sibling groups to fill %s", name, int(sizes[s]),
                        " and ".join(empty))
    return split


def _integer_targets(sizes: np.ndarray, fractions: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Images per (subclass, split) that sum to each subclass size, rounded so the totals also meet the fractions.

    Each subclass rounds its exact share up where the remainder plus the rounding debt carried over from the
    subclasses before it (in a seeded order) is largest: e.g. 12 images at 70/15/15 are 8/2/2 or 9/2/1, not
    always 8/2/2 (which would make train 67% overall).
    """
    exact = sizes[:, None] * fractions[None, :]
    target = np.floor(exact + 1e-9)
    debt = np.zeros(len(fractions))
    for s in rng.permutation(len(sizes)):
        missing = int(round(sizes[s] - target[s].sum()))
        priority = np.where(fractions > 0, exact[s] - target[s] + debt, -np.inf)
        chosen = np.argsort(-priority, kind="stable")[:missing]
        target[s, chosen] += 1
        debt += exact[s] - target[s]
    return target


def save_split(manifest: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Save a split manifest (must have a ``split`` column) as CSV, atomically."""
    if "split" not in manifest.columns:
        raise DataError("manifest has no 'split' column; call split_manifest first")
    return write_csv(manifest, path)


def load_split(
    path: str | os.PathLike, *, taxonomy: Taxonomy | None = None, check_files: bool = True
) -> pd.DataFrame:
    """Read a split manifest written by :func:`save_split`, relabelled with ``taxonomy``; checks it as
    :func:`check_split_table` does (columns, split names, files present, each file once)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; create one with `multitask scan DATA --out {path}`")
    frame = read_split_csv(path, dtype={"path": str, "subclass": str, "split": str}, keep_default_na=False)
    frame = check_split_table(frame, source=path, columns=("path", "subclass", "split"), splits=SPLITS,
                              check_files=check_files)
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    labelled = label_paths(frame, taxonomy or load_taxonomy())
    return pd.concat([labelled, frame[extra].reset_index(drop=True)], axis=1)


def read_split_csv(path: Path, **options) -> pd.DataFrame:
    """``pd.read_csv(path, **options)``; DataError naming the file when it is empty or not a CSV table."""
    try:
        return pd.read_csv(path, **options)
    except (ValueError, UnicodeDecodeError) as exc:  # EmptyDataError and ParserError are ValueErrors
        raise DataError(f"split file {path} cannot be read as a CSV table ({str(exc).splitlines()[0][:120]}); "
                        f"make one with `multitask scan DATA --out {path}`") from None


def check_split_table(
    frame: pd.DataFrame,
    *,
    source: str | os.PathLike,
    columns: Sequence[str] = ("path", "split"),
    splits: Sequence[str] | None = None,
    check_files: bool = True,
    relative_to: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """``frame`` when it is a usable split table (a copy whose relative paths, unless they exist as given, are
    joined to ``relative_to`` when that is given); DataError naming ``source``, the rows and the fix otherwise.

    Checks, in order: the ``columns`` are there; split values are among ``splits`` (when given); every listed
    file exists as a regular file (``check_files``); and no file is listed twice, compared by resolved path (two
    spellings of one file, or a link, count as one). A file in two splits is refused because the model would be
    tested on images it trained on. A repeated row within one split is refused too rather than dropped: no tool
    of ours writes one, so it means a hand edit or a concatenation, and keeping it would silently count the image
    twice in training or in the metrics; the fix (keep one row per file) is the user's to make.
    """
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)}; expected at least {', '.join(columns)} "
                        f"(found {', '.join(map(str, frame.columns)) or 'none'}); is this a split manifest?")
    if frame.empty:
        raise DataError(f"{source} lists no images (a header only); make a split with `multitask scan DATA --out "
                        "FILE`")
    if splits is not None:
        bad = sorted(set(frame["split"]) - set(splits))
        if bad:
            raise DataError(f"{source}: unknown split value(s) {', '.join(bad)}; expected {', '.join(splits)}")
    if relative_to is not None:
        frame = frame.assign(path=[p if os.path.isabs(p) or os.path.exists(p) else os.path.join(relative_to, p)
                                   for p in frame["path"]])
    if check_files:
        gone = [p for p in frame["path"] if not is_regular_file(p)]
        if gone:
            raise DataError(
                f"{source}: {len(gone)} of {len(frame)} listed images no longer exist (first: {gone[0]}); "
                "only regular files count. Restore the data at the same location, fix the paths, or make a new split "
                "with `multitask scan DATA --out`"
            )
    _check_each_file_once(frame, source=source)
    return frame


def _check_each_file_once(frame: pd.DataFrame, *, source: str | os.PathLike) -> None:
    resolved = pd.Series(resolved_paths(frame["path"]), index=frame.index)
    repeated = resolved.duplicated(keep=False)
    if not repeated.any():
        return
    splits_of = frame.loc[repeated, "split"].groupby(resolved[repeated], sort=False).agg(list)
    across = splits_of[splits_of.map(lambda names: len(set(names)) > 1)]
    if len(across):
        listing = first_few([f"{path} ({', '.join(names)})" for path, names in across.items()])
        raise DataError(
            f"{source}: {len(across)} file(s) are listed in more than one split, so the model would be tested on "
            f"images it trained on: {listing}. Keep one row per file (in the split it belongs to), or make a new "
            "split with `multitask scan DATA --out`"
        )
    listing = first_few([f"{path} ({len(names)} rows in {names[0]})" for path, names in splits_of.items()])
    raise DataError(
        f"{source}: {len(splits_of)} file(s) are listed more than once within one split, which would count each "
        f"image twice: {listing}. Delete the repeated rows (one row per file), or make a new split with "
        "`multitask scan DATA --out`"
    )


