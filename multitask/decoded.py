"""The decoded-image cache: every image decoded and resized once per image size into one uint8 array file.

JPEG decoding is the slow part of reading an image (a few thousand images per second on 16 cores, against ~17,000
images per second of InceptionV3 inference on an H200), and fine-tuning decoded every image again every epoch.
With this cache each image is decoded once per image size, by the same decoder and resize as ``multitask predict``
(:func:`multitask.data.load_image`), rounded to uint8, and written into ``decoded-<hash>.npy``: a plain NumPy
array of shape (images, size, size, 3) that is memory-mapped, so feature extraction and every fine-tuning epoch
read pixels instead of decoding files, and the batches travel to the model as uint8 (a quarter of float32's
bytes; the model casts them in its graph). 268,203 bytes per image at 299 px, 76,800 at 160 px.

It is keyed and checked like the feature cache (:mod:`multitask.features`): the key holds the image size, each
file's path, size and mtime and the decoder's version, and names the file. A JSON sidecar holds the key, the rows
that decoded and a CRC-32 of every chunk of the array; a cache whose sidecar is missing or different, whose array
has another shape, or whose bytes do not match their checksums is rebuilt, never used. Both files are written
atomically. Reading needs NumPy only (the GPU benchmark reads it under JAX); building it uses TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from multitask.errors import DataError
from multitask.files import atomic_path, check_free_space, read_json, write_json

log = logging.getLogger(__name__)

DECODED_CACHE_FORMAT = 1
CHECK_CHUNK_BYTES = 16 * 2**20  # the array's CRC-32s cover chunks of this size (threads check them in parallel)
DECODER = "tf.io.decode_image, antialiased tf.image.resize, clipped to 0..255, rounded to uint8"
READ_WORKERS = min(8, os.cpu_count() or 1)


def decoded_bytes(count: int, image_size: int) -> int:
    """Size on disk of a decoded-image cache of ``count`` images at ``image_size`` px (uint8 RGB)."""
    return int(count) * int(image_size) ** 2 * 3


def files_digest(paths: Sequence[str]) -> str:
    """SHA-256 over every file's path, size and mtime: what says that a cache was made from these very files."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@dataclass
class DecodedImages:
    """Decoded images of a list of files: ``images[i]`` is file ``i`` (zeros for a file that did not decode)."""

    images: np.ndarray  # (files, size, size, 3) uint8, memory-mapped read-only
    rows: np.ndarray  # (n,) int64 positions of the files that decoded
    path: Path
    reused: bool = False
    seconds: float = 0.0

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def record(self) -> dict[str, Any]:
        """JSON-ready description for config.json."""
        return {"path": str(self.path), "reused": self.reused, "images": int(len(self.rows)),
                "bytes": int(self.images.nbytes), "seconds": round(self.seconds, 3)}


# ----------------------------------------------------------------------------------------------- use or not


def wants_decoded_cache(choice: str, *, count: int, image_size: int, cache_dir: str | os.PathLike,
                        disk_share: float, distributed: bool = False) -> bool:
    """Whether ``--decoded-cache choice`` builds and uses the cache: ``on`` always (OSError when the disk is too
    small), ``off`` never, ``auto`` when it takes at most ``disk_share`` of the free space under ``cache_dir``.
    Never under several workers (each would decode every image)."""
    if choice == "off":
        return False
    if distributed:
        log.info("the decoded-image cache is not used when several workers train (each would decode every image)")
        return False
    needed = decoded_bytes(count, image_size)
    if choice == "on":
        check_free_space(cache_dir, needed, what="the decoded-image cache (--decoded-cache off reads the files)")
        return True
    free = _free_bytes(cache_dir)
    if needed > disk_share * free:
        log.info("decoded-image cache not used: %d images at %d px take %.1f GB, more than %.0f%% of the %.1f GB free "
                 "under %s (--decoded-cache on forces it)", count, image_size, needed / 1e9, 100 * disk_share,
                 free / 1e9, cache_dir)
        return False
    return True


def _free_bytes(folder: str | os.PathLike) -> int:
    import shutil

    folder = Path(folder)
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    return shutil.disk_usage(probe).free


# ----------------------------------------------------------------------------------------------- the cache


def decoded_cache_key(paths: Sequence[str], *, image_size: int) -> dict[str, Any]:
    """What decoded images depend on: the image size, each file's path/size/mtime, the decoder and its version."""
    import tensorflow as tf

    return {"format": DECODED_CACHE_FORMAT, "image_size": int(image_size), "files": files_digest(paths),
            "count": len(paths), "decoder": DECODER, "versions": {"tensorflow": tf.__version__}}


def decoded_images(paths: Sequence[str], *, image_size: int, cache_dir: str | os.PathLike, batch_size: int = 64,
                   verbose: int = 1) -> DecodedImages:
    """The decoded images of ``paths`` from the cache when its key and checksums match, else decoded now and cached
    atomically; DataError when no file decodes."""
    start = time.perf_counter()
    key_text = json.dumps(decoded_cache_key(paths, image_size=image_size), sort_keys=True)
    stem = f"decoded-{image_size}px-{hashlib.sha256(key_text.encode()).hexdigest()[:24]}"
    array_path, sidecar = Path(cache_dir) / f"{stem}.npy", Path(cache_dir) / f"{stem}.json"
    opened = open_decoded(array_path, sidecar, key_text=key_text, shape=(len(paths), image_size, image_size, 3))
    if opened is not None:
        log.info("reusing decoded images %s", array_path)
        images, rows = opened
        return DecodedImages(images, rows, array_path, True, time.perf_counter() - start)
    log.info("decoding %d images at %d px once -> %s (%.2f GB)", len(paths), image_size, array_path,
             decoded_bytes(len(paths), image_size) / 1e9)
    rows, checksums = _build(paths, image_size=image_size, batch_size=batch_size, path=array_path, verbose=verbose)
    write_json({"key": json.loads(key_text), "rows": rows.tolist(), "chunk_bytes": CHECK_CHUNK_BYTES,
                "crc32": checksums}, sidecar)
    images = np.load(array_path, mmap_mode="r")
    return DecodedImages(images, rows, array_path, False, time.perf_counter() - start)


def open_decoded(array_path: Path, sidecar: Path, *, key_text: str,
                 shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(memory-mapped images, decoded rows) of a cache whose sidecar holds exactly ``key_text`` and whose array has
    ``shape`` and matches its checksums; None (with a warning when something is damaged) otherwise."""
    if not (array_path.is_file() and sidecar.is_file()):
        return None
    try:
        record = read_json(sidecar)
        if json.dumps(record["key"], sort_keys=True) != key_text:
            return None  # another key with the same name: vanishingly unlikely, and still never trusted
        images = np.load(array_path, mmap_mode="r", allow_pickle=False)
        if images.dtype != np.uint8 or images.shape != tuple(shape):
            raise ValueError(f"array is {images.dtype} {images.shape}, expected uint8 {tuple(shape)}")
        if record["chunk_bytes"] != CHECK_CHUNK_BYTES or checksums(images) != record["crc32"]:
            raise ValueError("its bytes do not match their checksums")
        rows = np.asarray(record["rows"], np.int64)
        if rows.ndim != 1 or (len(rows) and (rows.min() < 0 or rows.max() >= shape[0])):
            raise ValueError("its decoded rows are out of range")
        return images, rows
    except (OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        log.warning("ignoring damaged decoded-image cache %s (%s); decoding again", array_path, exc)
        return None


def checksums(images: np.ndarray) -> list[int]:
    """CRC-32 of every CHECK_CHUNK_BYTES of ``images``' bytes, computed by threads (zlib releases the GIL)."""
    flat = images.reshape(-1)
    starts = range(0, flat.size, CHECK_CHUNK_BYTES)
    with ThreadPoolExecutor(READ_WORKERS) as pool:
        return list(pool.map(lambda s: zlib.crc32(flat[s:s + CHECK_CHUNK_BYTES]), starts))


def _build(paths: Sequence[str], *, image_size: int, batch_size: int, path: Path,
           verbose: int) -> tuple[np.ndarray, list[int]]:
    """Decode every file into a new array file at ``path`` (atomically); the decoded rows and the checksums."""
    import keras

    from multitask.data import indexed_images

    check_free_space(path.parent, decoded_bytes(len(paths), image_size), what="the decoded-image cache")
    progress = keras.utils.Progbar(-(-len(paths) // batch_size), verbose=verbose, unit_name="batch")
    rows = []
    with atomic_path(path) as tmp:
        images = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), image_size, image_size, 3))
        for step, (index, batch) in enumerate(indexed_images(paths, image_size=image_size, batch_size=batch_size),
                                              start=1):
            index = index.numpy()
            images[index] = batch.numpy().astype(np.uint8)  # exact: load_image clips and rounds to whole numbers
            rows.append(index)
            progress.update(step, finalize=step == progress.target)
        if not rows:
            raise DataError(f"none of the {len(paths)} images could be decoded (first: {paths[0] if paths else '-'})")
        images.flush()
        sums = checksums(images)
        del images  # close the map before the file is renamed
    return np.sort(np.concatenate(rows)).astype(np.int64), sums


# ----------------------------------------------------------------------------------------------- reading


def read_batches(images: np.ndarray, positions: np.ndarray, *, batch_size: int, workers: int = READ_WORKERS,
                 ahead: int = 4) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions, uint8 images) batches of ``images[positions]`` in order, read by ``workers`` threads up to
    ``ahead`` batches before they are asked for. NumPy only: any Keras backend can consume it."""
    positions = np.asarray(positions, np.int64)
    chunks = [positions[i:i + batch_size] for i in range(0, len(positions), batch_size)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(np.take, images, chunk, axis=0)))
            if len(pending) > ahead:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


def decoded_dataset(decoded: DecodedImages, positions: np.ndarray, labels, *, batch_size: int,
                    training: bool = False, seed: int | None = None, sample_weight=None, augment=None):
    """Batches of (images, labels[, sample_weight]) like :func:`multitask.data.make_dataset`'s, read from the cache:
    uint8 images, or float32 after ``augment`` (training only, per epoch, on the decoded arrays)."""
    import tensorflow as tf

    autotune = tf.data.AUTOTUNE
    size = decoded.image_size
    parts = (positions, labels) if sample_weight is None else (positions, labels, sample_weight)
    ds = tf.data.Dataset.from_tensor_slices(parts)
    if training:
        ds = ds.shuffle(len(positions), seed=seed, reshuffle_each_iteration=True)

    def gather(index):
        images = tf.numpy_function(lambda i: np.take(decoded.images, i, axis=0), [index], tf.uint8, stateful=False)
        images.set_shape((None, size, size, 3))
        return images

    ds = ds.batch(batch_size).map(lambda index, *rest: (gather(index), *rest), num_parallel_calls=autotune)
    if augment is not None and training:
        from multitask.augment import augment_calls  # in order on a CPU, so a seed gives the same model

        ds = ds.map(lambda x, *rest: (augment(tf.cast(x, tf.float32)), *rest), num_parallel_calls=augment_calls())
    return ds.prefetch(autotune)
