"""Folders -> manifest (pandas), and manifest rows -> tf.data. Splitting lives in :mod:`multitask.splits`; nothing
about models here.

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
from multitask.filesystem import (
    WalkReport,
    file_kind,
    is_regular_file,
    log_walk_report,
    walk_files,
)
from multitask.settings import BALANCES
from multitask.taxonomy import TASKS, Taxonomy, load_taxonomy

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
# The largest image decoded (8000 x 8000): decoding and resizing it takes about 1 GB in TensorFlow. The Kaggle set's
# images are 512 x 512; a larger file is refused from its header, before any decoding (multitask.data.oversized).
MAX_IMAGE_PIXELS = 64_000_000
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
    try:
        kind = file_kind(os.stat(path).st_mode)
        if kind != "regular file":
            return f"not a regular file (a {kind})"
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:  # a link loop (ELOOP), a name too long, a permission denied on the way...
        return f"cannot be opened ({exc.strerror})"
    return oversized(path) or decoding_problem(path)


def oversized(path: str) -> str | None:
    """Why the image at ``path`` is too large to decode, judged from its header alone (nothing is decoded), or
    None. A 50000 x 50000 PNG of a few MB decodes to 7.5 GB: such files get an error row instead of exhausting
    the memory. Files PIL cannot identify pass (TensorFlow's decoder judges them)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as exc:  # PIL's own limit, far above ours: refused while reading the header
        return f"image too large to decode ({exc})"
    except Exception:  # noqa: BLE001 - not an image PIL knows, or unreadable: decoding_problem says which
        return None
    if width * height > MAX_IMAGE_PIXELS:
        return (f"image too large to decode: {width}x{height} px ({width * height / 1e6:.0f} megapixels; the limit "
                f"is {MAX_IMAGE_PIXELS / 1e6:.0f})")
    return None


def decoding_problem(source) -> str | None:
    """Why PIL cannot fully decode ``source`` (a path, or a binary file object such as an upload), or None."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            im.load()  # full decode: catches truncation, not just a valid header
    except FileNotFoundError:
        return "file not found"
    except UnidentifiedImageError:
        return "not an image (unrecognised content)"
    except Image.DecompressionBombError as exc:
        return f"image too large to decode ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"corrupt image ({exc})"
    return None


def find_unreadable(paths: Iterable[str], *, workers: int | None = None) -> dict[str, str]:
    """Decode every file once (threads: PIL releases the GIL) and map each unreadable one to its reason."""
    paths = list(paths)
    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 2) * 2)) as pool:
        problems = pool.map(image_problem, paths, chunksize=64)
        return {p: why for p, why in zip(paths, problems, strict=True) if why is not None}


def counts_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Image counts per organ x cancer label, with totals."""
    return pd.crosstab(manifest["organ"], manifest["cancer"], margins=True, margins_name="Total")


# ----------------------------------------------------------------------------------------------- tf.data


def load_image(path, image_size: int):
    """Read, decode by content (JPEG/PNG/BMP/GIF, whatever the extension) to RGB, resize: float32 in 0..255, whole
    numbers (see :func:`decode_image`)."""
    import tensorflow as tf

    return decode_image(tf.io.read_file(path), image_size)


def decode_image(data, image_size: int):
    """:func:`load_image` for encoded bytes already in memory (the server's uploads): the same decoder and resize,
    so an uploaded file gets exactly the answer ``multitask predict`` gives for it."""
    import tensorflow as tf

    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    # Clipped (an antialiased resize can overshoot slightly) and rounded to whole numbers: the pixels of a uint8
    # image, so the decoded-image cache (multitask.decoded) holds exactly what every other path feeds the model,
    # and training from it sees the same inputs as predict and serve.
    return tf.round(tf.clip_by_value(image, 0.0, 255.0))


def indexed_images(paths: Sequence[str], *, image_size: int, batch_size: int):
    """Batches of (row indices into ``paths``, images); files that fail to read or decode are dropped, so their
    index is simply absent (callers find the failed rows by what is missing).

    Only regular files reach TensorFlow: opening a FIFO would block its reader thread, and the caller, forever.
    Nor do images too large to decode (:func:`oversized`, from the header: about 40 us per file).
    """
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    paths = list(paths)
    index = [i for i, path in enumerate(paths) if is_regular_file(path) and oversized(path) is None]
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


def organ_weights(train: pd.DataFrame, tasks: Sequence[str]) -> dict[str, dict[int, float]]:
    """Per task, the same weight per organ id: the inverse of the organ's share of the training rows, normalised so
    that the rows' mean weight is 1 (``n / (k * n_organ)`` for n rows of k organs). Every organ then weighs as much
    as any other in each head's loss, the cancer head's included; :func:`sample_weights` with ``by="organ"`` reads
    them."""
    counts = train["organ_id"].value_counts()
    per_organ = {int(organ): len(train) / (len(counts) * int(n)) for organ, n in counts.sort_index().items()}
    return {task: dict(per_organ) for task in tasks}


def balance_weights(train: pd.DataFrame, tasks: Sequence[str], mode: str) -> dict[str, dict[int, float]] | None:
    """The ``--balance`` weights of the training rows (settings.BALANCES): None for "none", :func:`class_weights` for
    "classes", :func:`organ_weights` for "organs"; read them with :func:`sample_weights` ``by=BALANCE_KEYS[mode]``."""
    if mode == "none":
        return None
    if mode == "classes":
        return class_weights(train, tasks)
    if mode == "organs":
        return organ_weights(train, tasks)
    raise ConfigError(f"$balance must be one of {', '.join(BALANCES)}, got {mode!r}")


BALANCE_KEYS = {"classes": None, "organs": "organ"}  # --balance mode -> the label whose id picks every head's weight


def sample_weights(frame: pd.DataFrame, weights: dict[str, dict[int, float]], *,
                   by: str | None = None) -> dict[str, np.ndarray]:
    """Per-row weights of ``frame`` for each task of ``weights``: looked up by the row's own ``<task>_id``
    (:func:`class_weights`), or by its ``<by>_id`` for every task (``by="organ"``: :func:`organ_weights`); ids unseen
    in training weigh 1."""
    return {
        task: frame[f"{by or task}_id"].map(lambda c, w=per_id: w.get(int(c), 1.0)).to_numpy(np.float32)
        for task, per_id in weights.items()
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
        from multitask.augment import augment_calls  # in order on a CPU, so a seed gives the same model

        ds = ds.map(lambda x, *rest: (augment(x), *rest), num_parallel_calls=augment_calls())
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
