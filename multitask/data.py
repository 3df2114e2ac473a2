"""Folders -> manifest (pandas) -> split -> tf.data. Nothing about models here.

The Kaggle "Multi Cancer" set is laid out as ``Multi Cancer/<Type>/<subclass>/<file>.jpg`` (the current
version nests a second ``Multi Cancer/``). :func:`scan` finds subclass folders by *name* at any depth, so the
download root, either version's layout, or a single type folder all work.

TensorFlow is imported inside the tf.data functions only, so scanning and splitting stay fast.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.errors import ConfigError, DataError
from multitask.files import write_csv
from multitask.filesystem import (
    WalkReport,
    file_kind,
    first_few,
    is_regular_file,
    log_walk_report,
    resolved_paths,
    walk_files,
)
from multitask.settings import DEFAULT_FRACTIONS, DEFAULT_SPLIT_METHOD, SPLIT_METHODS, SPLITS, check_fractions
from multitask.taxonomy import TASKS, Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
MANIFEST_COLUMNS = ("path", "subclass", "organ", "cancer", "organ_id", "cancer_id")
LAYOUT_HINT = "expected <Type>/<subclass>/*.jpg, e.g. 'Brain Cancer/brain_glioma/brain_glioma_0001.jpg'"


def is_image_file(path: str | os.PathLike) -> bool:
    """True for a visible file whose extension (any case) is a supported image format."""
    name = os.path.basename(path)
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass(kw_only=True)
class ScanReport(WalkReport):
    """What :func:`scan_tree` found besides the manifest."""

    root: str
    unknown_folders: dict[str, int] = field(default_factory=dict)  # folder path -> image count
    missing_subclasses: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> reason


@dataclass
class Scan:
    manifest: pd.DataFrame
    report: ScanReport


def scan_tree(
    root: str | os.PathLike,
    *,
    taxonomy: Taxonomy | None = None,
    verify: bool = False,
    allow_unknown: bool = False,
    workers: int | None = None,
) -> Scan:
    """Walk ``root`` and return the labelled manifest plus a report of what was skipped and why."""
    taxonomy = taxonomy or load_taxonomy()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder; {LAYOUT_HINT}")
    known = set(taxonomy.subclasses)
    report = ScanReport(root=str(root))
    rows: list[tuple[str, str]] = []
    seen_at: dict[str, list[str]] = {}
    for dirpath, images in walk_files(root, keep=is_image_file, report=report):
        if not images:
            continue
        name = os.path.basename(dirpath)
        if name not in known:
            report.unknown_folders[dirpath] = len(images)
            continue
        seen_at.setdefault(name, []).append(dirpath)
        rows.extend((path, name) for path in images)
    log_walk_report(report, root)

    if report.unknown_folders and not allow_unknown:
        listing = "; ".join(f"{p} ({n} images)" for p, n in sorted(report.unknown_folders.items())[:10])
        raise DataError(
            f"{len(report.unknown_folders)} image folder(s) under {root} are not subclasses of the taxonomy "
            f"({taxonomy.source}): {listing}. Add them to a $taxonomy CSV, or pass $allow_unknown to skip them."
        )
    for path, count in report.unknown_folders.items():
        log.warning("skipping %s (%d images): folder name is not in the taxonomy", path, count)
    for name, dirs in seen_at.items():
        if len(dirs) > 1:
            log.warning("subclass %s found in %d folders (%s); all are used", name, len(dirs), ", ".join(dirs))
    if not rows:
        raise DataError(f"no images under {root}: {LAYOUT_HINT}")

    report.missing_subclasses = [s for s in taxonomy.subclasses if s not in seen_at]
    if report.missing_subclasses:
        log.warning("%d subclass(es) not found under %s: %s", len(report.missing_subclasses), root,
                    ", ".join(report.missing_subclasses))

    manifest = label_paths(pd.DataFrame(rows, columns=["path", "subclass"]), taxonomy)
    if verify:
        report.unreadable = find_unreadable(manifest["path"], workers=workers)
        for path, reason in report.unreadable.items():
            log.warning("dropping unreadable image %s: %s", path, reason)
        manifest = manifest[~manifest["path"].isin(report.unreadable)].reset_index(drop=True)
        if manifest.empty:
            raise DataError(f"every image under {root} is unreadable; see the report above")
    return Scan(manifest=manifest, report=report)


def scan(root: str | os.PathLike, **options) -> pd.DataFrame:
    """Manifest of every image under ``root``: path, subclass, organ, cancer, organ_id, cancer_id."""
    return scan_tree(root, **options).manifest


def label_paths(frame: pd.DataFrame, taxonomy: Taxonomy) -> pd.DataFrame:
    """Add organ/cancer names and integer ids to a frame with ``path`` and ``subclass`` columns."""
    table = taxonomy.table.set_index("subclass")
    out = frame[["path", "subclass"]].copy()
    out["organ"] = out["subclass"].map(table["organ"])
    out["cancer"] = out["subclass"].map(table["cancer"])
    if out["organ"].isna().any():
        bad = sorted(out.loc[out["organ"].isna(), "subclass"].unique())
        raise DataError(f"subclass(es) {', '.join(bad)} are not in the taxonomy ({taxonomy.source})")
    for task in TASKS:
        ids = {label: i for i, label in enumerate(taxonomy.labels(task))}
        out[f"{task}_id"] = out[task].map(ids).astype("int64")
    return out.reset_index(drop=True)


def image_problem(path: str) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes fully. Only regular files are opened."""
    from PIL import Image, UnidentifiedImageError

    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind != "regular file":
            return f"not a regular file (a {kind})"
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.load()  # full decode: catches truncation, not just a valid header
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image (unrecognised content)"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt image ({exc})"
    return None


def find_unreadable(paths: Iterable[str], *, workers: int | None = None) -> dict[str, str]:
    """Decode every file once (threads: PIL releases the GIL) and map each unreadable one to its reason."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        problems = pool.map(image_problem, paths, chunksize=64)
        return {p: why for p, why in zip(paths, problems, strict=True) if why is not None}


# ----------------------------------------------------------------------------------------------- splits


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
        from multitask.grouping import find_sibling_groups
        from multitask.settings import GroupingParams

        min_inliers = GroupingParams.min_inliers if min_inliers is None else min_inliers
        groups = find_sibling_groups(manifest, params=GroupingParams(min_inliers=min_inliers), cache_dir=cache_dir,
                                     workers=workers).groups
    groups = np.asarray(groups)
    if len(groups) != len(out) or pd.isna(groups).any():
        raise DataError(f"got {len(groups)} group ids ({int(pd.isna(groups).sum())} missing) for {len(out)} "
                        "manifest rows; give one id per row")
    out["split"] = _split_groups(out["subclass"].to_numpy(object), groups, fractions=fractions, seed=seed)
    out["group"] = pd.factorize(groups)[0]
    out["split_method"] = "grouped"
    if min_inliers is not None:
        out["split_min_inliers"] = int(min_inliers)
    return out


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
    frame = pd.read_csv(path, dtype={"path": str, "subclass": str, "split": str}, keep_default_na=False)
    frame = check_split_table(frame, source=path, columns=("path", "subclass", "split"), splits=SPLITS,
                              check_files=check_files)
    extra = [c for c in frame.columns if c not in MANIFEST_COLUMNS]
    labelled = label_paths(frame, taxonomy or load_taxonomy())
    return pd.concat([labelled, frame[extra].reset_index(drop=True)], axis=1)


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


def counts_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Image counts per organ x cancer label, with totals."""
    return pd.crosstab(manifest["organ"], manifest["cancer"], margins=True, margins_name="Total")


# ----------------------------------------------------------------------------------------------- tf.data


def load_image(path, image_size: int):
    """Read, decode by content (JPEG/PNG/BMP/GIF, whatever the extension) to RGB, resize: float32 in 0..255."""
    import tensorflow as tf

    return decode_image(tf.io.read_file(path), image_size)


def decode_image(data, image_size: int):
    """:func:`load_image` for encoded bytes already in memory (the server's uploads): the same decoder and resize,
    so an uploaded file gets exactly the answer ``multitask predict`` gives for it."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)  # antialiased resize can overshoot slightly


def indexed_images(paths: Sequence[str], *, image_size: int, batch_size: int):
    """Batches of (row indices into ``paths``, images); files that fail to read or decode are dropped, so their
    index is simply absent (callers find the failed rows by what is missing).

    Only regular files reach TensorFlow: opening a FIFO would block its reader thread, and the caller, forever.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    paths = list(paths)
    index = [i for i, path in enumerate(paths) if is_regular_file(path)]
    names = tf.constant([paths[i] for i in index], tf.string)  # bytes, not numpy's fixed-width unicode: small
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(index, tf.int64), names))
    ds = ds.map(lambda index, path: (index, load_image(path, image_size)), num_parallel_calls=autotune)
    return ds.ignore_errors().batch(batch_size).prefetch(autotune)


def class_weights(train: pd.DataFrame, tasks: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per task, sklearn's 'balanced' class weights of the training rows: every class counts equally."""
    from sklearn.utils.class_weight import compute_class_weight

    out = {}
    for task in tasks:
        labels = train[f"{task}_id"].to_numpy()
        classes = np.unique(labels)
        weights = compute_class_weight("balanced", classes=classes, y=labels)
        out[task] = {int(c): float(w) for c, w in zip(classes, weights, strict=True)}
    return out


def sample_weights(frame: pd.DataFrame, weights: dict[str, dict[int, float]]) -> dict[str, np.ndarray]:
    """Per-row weights of ``frame`` from :func:`class_weights` (classes unseen in training weigh 1)."""
    return {
        task: frame[f"{task}_id"].map(lambda c, w=per_class: w.get(int(c), 1.0)).to_numpy(np.float32)
        for task, per_class in weights.items()
    }


def task_labels(manifest: pd.DataFrame, task: str) -> dict[str, np.ndarray] | np.ndarray:
    """Label arrays: ``{"organ": ids, "cancer": ids}`` for ``task="joint"``, else one id array."""
    if task == "joint":
        return {t: manifest[f"{t}_id"].to_numpy(np.int32) for t in TASKS}
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected joint, organ or cancer")
    return manifest[f"{task}_id"].to_numpy(np.int32)


def make_dataset(
    manifest: pd.DataFrame,
    *,
    image_size: int,
    batch_size: int,
    task: str = "joint",
    training: bool = False,
    seed: int | None = None,
    sample_weight: np.ndarray | dict[str, np.ndarray] | None = None,
    augment=None,
    with_labels: bool = True,
    known_length: bool = False,
):
    """Batches of (float32 RGB images in 0..255, labels[, sample_weight]) from a manifest.

    Shuffles only when ``training``; ``augment`` (a batch -> batch callable) runs on training batches only.
    Files that fail to decode are skipped with a logged warning instead of stopping a run, which leaves the number
    of batches unknown; ``known_length=True`` declares it (for progress bars) when every file is known to decode,
    and TensorFlow then stops with an error if one does not after all.
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    paths = manifest["path"].to_numpy(str)
    if not with_labels:
        ds = tf.data.Dataset.from_tensor_slices(paths)
    elif sample_weight is None:
        ds = tf.data.Dataset.from_tensor_slices((paths, task_labels(manifest, task)))
    else:
        ds = tf.data.Dataset.from_tensor_slices((paths, task_labels(manifest, task), sample_weight))
    if training:  # shuffle paths, not decoded images: a full-size buffer costs nothing
        ds = ds.shuffle(len(manifest), seed=seed, reshuffle_each_iteration=True)
    # Element structure is path or (path, labels[, weights]); only the first part changes, below.
    ds = ds.map(lambda path, *rest: (load_image(path, image_size), *rest), num_parallel_calls=autotune)
    if not with_labels:
        ds = ds.map(lambda image: image)  # unwrap the 1-tuple
    ds = ds.ignore_errors(log_warning=True).batch(batch_size)
    if known_length:
        ds = ds.apply(tf.data.experimental.assert_cardinality(-(-len(manifest) // batch_size)))
    if augment is not None and training:
        ds = ds.map(lambda x, *rest: (augment(x), *rest), num_parallel_calls=autotune)
    return ds.prefetch(autotune)


# ----------------------------------------------------------------------------------------------- download

KAGGLE_HANDLE = "obulisainaren/multi-cancer"


def download(dest: str | os.PathLike | None = None) -> Path:
    """Download the Kaggle "Multi Cancer" set with kagglehub and return the folder to pass as ``--data``."""
    import kagglehub

    try:
        path = kagglehub.dataset_download(KAGGLE_HANDLE, output_dir=str(dest) if dest else None)
    except Exception as exc:  # kagglehub raises requests, HTTP and its own errors alike
        raise DataError(
            f"could not download {KAGGLE_HANDLE} from Kaggle ({type(exc).__name__}: {str(exc)[:200]}). "
            "Check your internet connection and Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/"
            "KAGGLE_KEY), or download it by hand: open https://www.kaggle.com/datasets/" + KAGGLE_HANDLE +
            ", click Download, unzip the archive anywhere, and pass that folder as $data (any folder "
            "above the <Type>/<subclass>/ folders works)."
        ) from exc
    return Path(path)
