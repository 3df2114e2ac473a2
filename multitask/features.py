"""The frozen-backbone feature cache: pooled features of every image, computed once and reused while valid.

While the backbone is frozen (training phase 1), the heads see the same pooled features every epoch, so they are
computed once per image and cached on disk. The cache key holds everything the features depend on: the
backbone's weights (a SHA-256 of every value: ImageNet, a weights file or a seeded random init), the image size,
each file's path, size and mtime, the backbone's precision and the library versions; a stale cache is never
used, and a damaged one is recomputed. Pixels read from the files or from the decoded-image cache
(:mod:`multitask.decoded`) are the same whole numbers, so either gives the same features and the same key.
Files that cannot be decoded are skipped, and their positions recorded.

The same pass can compute other outputs of the backbone's graph (``extra_outputs``: the out-of-distribution
detector's blocks, :mod:`multitask.ood`), cached beside the features under the same key, so training fits that
detector without a second pass over its images while the layers it taps stay frozen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from multitask.data import indexed_images
from multitask.decoded import DecodedImages, files_digest, read_batches
from multitask.errors import DataError
from multitask.files import atomic_path

log = logging.getLogger(__name__)

# 2: pixels rounded to whole numbers by the decoder; 3: arrays' SHA-256 stored; 4: extra outputs stored beside
FEATURE_CACHE_FORMAT = 4
FEATURES = "features"  # the name of the pooled features among a pass's outputs
EXTRA_PREFIX = "extra_"  # an extra output's array in the cache file
SKIPPED_SHOWN = 20


@dataclass
class Features:
    """Pooled backbone features of the rows of a manifest that decoded; ``rows`` are their positions."""

    values: np.ndarray  # (n, FEATURE_DIM) float32
    rows: np.ndarray  # (n,) int64 positions in the manifest the features were computed for
    path: Path
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded
    reused: bool = False
    seconds: float = 0.0
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # extra_outputs of the same rows, by name


def weights_fingerprint(model) -> str:
    """SHA-256 of every weight of ``model``: the identity of ImageNet, a weights file, or a seeded random init."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(np.asarray(variable)).tobytes())
    return digest.hexdigest()


def feature_cache_key(paths: Sequence[str], *, image_size: int, fingerprint: str,
                      precision: str = "float32", extra: Sequence[str] = ()) -> dict[str, Any]:
    """What cached features depend on: backbone weights, image size, each file's path/size/mtime, the backbone's
    precision, versions, and the names of the extra outputs stored with them."""
    import keras
    import tensorflow as tf

    return {
        "format": FEATURE_CACHE_FORMAT,
        "weights": fingerprint,
        "image_size": int(image_size),
        "files": files_digest(paths),
        "count": len(paths),
        "precision": precision,
        "extra": sorted(extra),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }


def extract_features(backbone, paths: Sequence[str], *, image_size: int, batch_size: int, verbose: int = 1,
                     decoded: DecodedImages | None = None, jit_compile: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of every file that decodes, and the positions of those files in ``paths``; the pixels come
    from ``decoded`` (uint8, cast inside the graph) when given, else from decoding the files."""
    outputs, rows = extract_outputs(backbone, paths, image_size=image_size, batch_size=batch_size, verbose=verbose,
                                    decoded=decoded, jit_compile=jit_compile)
    return outputs[FEATURES], rows


def model_outputs(model, paths: Sequence[str], *, image_size: int, batch_size: int, verbose: int = 0,
                  decoded: DecodedImages | None = None,
                  jit_compile: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``model``'s outputs (``{name: (n, ...) float32}``; a single output is named :data:`FEATURES`) for every file
    that decodes (or every image ``decoded`` holds), and the positions of those files in ``paths``, in the order the
    batches came; ``({}, [])`` when none decodes. The one inference pass over files that training's feature pass,
    its calibration and the OOD detector share."""
    import keras
    import tensorflow as tf

    def named(outputs):
        return outputs if isinstance(outputs, dict) else {FEATURES: outputs}

    forward = tf.function(lambda images: named(model(images, training=False)), reduce_retracing=True,
                          jit_compile=jit_compile)
    if decoded is None:
        batches = indexed_images(list(paths), image_size=image_size, batch_size=batch_size)
    else:
        batches = read_batches(decoded.images, decoded.rows, batch_size=batch_size)
    progress = keras.utils.Progbar(-(-len(paths) // batch_size), verbose=verbose, unit_name="batch")
    values, rows = [], []
    for step, (index, images) in enumerate(batches, start=1):
        values.append({name: np.asarray(v, np.float32) for name, v in forward(images).items()})
        rows.append(np.asarray(index))
        progress.update(step, finalize=step == progress.target)
    if len(values) < progress.target:  # undecodable files left the last batches short
        progress.update(len(values), finalize=True)
    if not rows:
        return {}, np.zeros(0, np.int64)
    return {name: np.concatenate([part[name] for part in values]) for name in values[0]}, np.concatenate(rows)


def extract_outputs(model, paths: Sequence[str], *, image_size: int, batch_size: int, verbose: int = 1,
                    decoded: DecodedImages | None = None,
                    jit_compile: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`model_outputs` for the feature pass: DataError when no image decodes, and a warning naming each file
    that does not (the first SKIPPED_SHOWN)."""
    values, rows = model_outputs(model, paths, image_size=image_size, batch_size=batch_size, verbose=verbose,
                                 decoded=decoded, jit_compile=jit_compile)
    if not len(rows):
        raise DataError(f"none of the {len(paths)} images could be decoded (first: {paths[0] if paths else '-'})")
    skipped = skipped_paths(paths, rows)
    for path in skipped[:SKIPPED_SHOWN]:
        log.warning("skipping %s: it could not be read or decoded as an image", path)
    if len(skipped) > SKIPPED_SHOWN:
        log.warning("... and %d more unreadable images", len(skipped) - SKIPPED_SHOWN)
    return values, rows


def cached_features(backbone, paths: Sequence[str], *, image_size: int, batch_size: int,
                    cache_dir: str | os.PathLike, verbose: int = 1, workers=None,
                    decoded: DecodedImages | Callable[[], DecodedImages] | None = None,
                    jit_compile: bool = False, extra_outputs: Mapping[str, Any] | None = None) -> Features:
    """Features of ``paths`` from the cache when its key matches exactly, else computed (from ``decoded`` when
    given: :func:`extract_features`; a callable is called only then) and cached atomically.

    ``extra_outputs`` (``{name: a tensor of backbone's graph}``, each (batch, D)) are computed in the same pass and
    cached with the features (:attr:`Features.extra`); the cache key names them.

    With ``workers`` (a :class:`multitask.distribute.Workers`, multi-worker training) the cache is used only if
    every worker has it; otherwise each worker computes every ``count``-th image from its ``rank`` on and the
    shares are summed across workers, so every worker holds all features, each computed once.
    """
    import keras

    start = time.perf_counter()
    extra_outputs = dict(extra_outputs or {})
    if FEATURES in extra_outputs:
        raise ValueError(f"an extra output cannot be named {FEATURES!r}: that is the features' own name")
    key = feature_cache_key(paths, image_size=image_size, fingerprint=weights_fingerprint(backbone),
                            precision=backbone_precision(backbone), extra=tuple(extra_outputs))
    key_text = json.dumps(key, sort_keys=True)
    path = Path(cache_dir) / f"features-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}.npz"
    log.debug("feature cache key %s", key_text)
    cached = _read_cache(path, key_text)
    if workers is not None:  # the workers must take the same branch: the shares below are collective
        missing = int(workers.all_sum(np.asarray([cached is None], np.int64))[0])
        cached = cached if missing == 0 else None
    if cached is not None:
        log.info("reusing cached features %s", path)
        values, rows, extra = cached
        return Features(values, rows, path, skipped_paths(paths, rows), True, time.perf_counter() - start, extra)
    log.info("computing backbone features of %d images at %d px -> %s", len(paths), image_size, path)
    model = keras.Model(backbone.input, {FEATURES: backbone.output, **extra_outputs}) if extra_outputs else backbone
    if workers is None:
        decoded = decoded() if callable(decoded) else decoded
        outputs, rows = extract_outputs(model, paths, image_size=image_size, batch_size=batch_size, verbose=verbose,
                                        decoded=decoded, jit_compile=jit_compile)
    else:
        outputs, rows = shared_outputs(model, paths, image_size=image_size, batch_size=batch_size,
                                       verbose=verbose, workers=workers)
    values, extra = outputs.pop(FEATURES), outputs
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, values=values, rows=rows, key=np.asarray(key_text),
                 digest=np.asarray(_digest(values, rows, extra)),
                 **{EXTRA_PREFIX + name: array for name, array in extra.items()})
    return Features(values, rows, path, skipped_paths(paths, rows), False, time.perf_counter() - start, extra)


def backbone_precision(backbone) -> str:
    """The dtype policy most of ``backbone``'s layers compute in ("float32", "mixed_bfloat16", ...)."""
    names = [layer.dtype_policy.name for layer in backbone.layers]
    return max(set(names), key=names.count)


def _read_cache(path: Path, key_text: str) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]] | None:
    """(values, rows, extra outputs) of the cache file at ``path`` if it holds exactly ``key_text`` and arrays of the
    shapes it promises, else None. A cache is never trusted: a file cut short, a flipped bit (the stored SHA-256 of
    the arrays; numpy does not always reach zipfile's CRC check), a key that does not match its own file name, or any
    other reading error means it is recomputed, with a warning."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            if str(stored["key"]) != key_text:  # the name is the key's hash: another key here is damage
                raise ValueError("its key does not match its file name")
            values, rows = np.asarray(stored["values"]), np.asarray(stored["rows"])
            key = json.loads(key_text)
            extra = {name: np.asarray(stored[EXTRA_PREFIX + name]) for name in key["extra"]}
            if str(stored["digest"]) != _digest(values, rows, extra):
                raise ValueError("its arrays do not match their stored SHA-256")
        count = key["count"]
        if not (values.ndim == 2 and rows.ndim == 1 and len(values) == len(rows) and rows.dtype.kind in "iu"
                and (len(rows) == 0 or (rows.min() >= 0 and rows.max() < count)) and np.isfinite(values).all()
                and all(a.ndim == 2 and len(a) == len(rows) and np.isfinite(a).all() for a in extra.values())):
            raise ValueError(f"arrays of shapes {values.shape}, {rows.shape} and "
                             f"{[a.shape for a in extra.values()]} do not fit {count} images")
        return values, rows, extra
    except Exception as exc:  # noqa: BLE001 - numpy, zipfile and zlib raise many kinds for a damaged file
        log.warning("ignoring unreadable feature cache %s (%s: %s); recomputing", path, type(exc).__name__,
                    str(exc)[:160])
    return None


def _digest(values: np.ndarray, rows: np.ndarray, extra: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of a cache's arrays, stored beside them so a damaged file is never read as features."""
    digest = hashlib.sha256(np.ascontiguousarray(values).tobytes())
    digest.update(np.ascontiguousarray(rows).tobytes())
    for name in sorted(extra):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(extra[name]).tobytes())
    return digest.hexdigest()


def shared_outputs(model, paths: Sequence[str], *, image_size: int, batch_size: int, workers,
                   verbose: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`extract_outputs` of all ``paths``, each worker computing every ``workers.count``-th one from
    ``workers.rank`` on, combined by a sum across the workers (every row is owned by exactly one worker)."""
    mine = np.arange(workers.rank, len(paths), workers.count)
    share = [paths[i] for i in mine]
    try:
        outputs, rows = extract_outputs(model, share, image_size=image_size, batch_size=batch_size, verbose=verbose)
    except DataError:  # none of this worker's share decodes: say so in the sum, like any unreadable file
        shapes = model.output if isinstance(model.output, dict) else {FEATURES: model.output}
        outputs = {name: np.zeros((0, int(t.shape[-1])), np.float32) for name, t in shapes.items()}
        rows = np.zeros(0, np.int64)
    decoded = np.zeros(len(paths), np.int64)
    decoded[mine[rows]] = 1
    owners = np.zeros(len(paths), np.int64)
    owners[mine] = 1
    full = {}
    for name, values in outputs.items():
        full[name] = np.zeros((len(paths), values.shape[1]), np.float32)
        full[name][mine[rows]] = values
        full[name] = workers.all_sum(full[name])
    decoded, owners = workers.all_sum(decoded), workers.all_sum(owners)
    if not np.all(owners == 1):
        raise DataError(f"the {workers.count} workers did not split the {len(paths)} images exactly once each "
                        f"({int((owners != 1).sum())} images computed 0 or 2+ times); do all workers run the same "
                        "command on the same data?")
    rows = np.flatnonzero(decoded)
    if not len(rows):
        raise DataError(f"none of the {len(paths)} images could be decoded (first: {paths[0] if paths else '-'})")
    return {name: values[rows] for name, values in full.items()}, rows.astype(np.int64)


def skipped_paths(paths: Sequence[str], rows: np.ndarray) -> list[str]:
    """The entries of ``paths`` whose positions are not in ``rows`` (the files that did not decode)."""
    return [paths[i] for i in np.setdiff1d(np.arange(len(paths)), rows)]


def features_dataset(features: np.ndarray, labels: dict[str, np.ndarray], *, batch_size: int,
                     sample_weight: dict[str, np.ndarray] | None = None, training: bool = False, seed: int = 0):
    """Batches of (features, {task: labels}[, {task: weights}]) for training the heads."""
    import tensorflow as tf

    parts = (features, labels) if sample_weight is None else (features, labels, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if training:
        ds = ds.shuffle(len(features), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
