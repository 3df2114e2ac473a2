"""Find augmented siblings of one source image, so a split can keep them together (audits: multitask.audit).

The Kaggle "Multi Cancer" set makes 5,000 images per subclass by rotating (<=10 deg), shifting and zooming
(<=10%), flipping and re-lighting (0.8-1.2) far fewer source images. Global descriptors with a distance threshold
cannot tell such siblings from other images of the same class, so the work is done in two steps:

1. *propose*: each image's ORB descriptors (of the image and of its mirror) are hashed into a bag of visual words;
   the ``k`` nearest neighbours of that histogram, within the same subclass, are the candidates;
2. *verify*: a candidate pair is a sibling pair when ratio-tested ORB matches fit one rotation+scale+shift
   (``cv2.estimateAffinePartial2D`` with RANSAC) with at least ``min_inliers`` inliers.

Groups are the connected components of verified links. The cost is linear in the number of images (k
verifications each, never all pairs) apart from the histogram search, which is quadratic within a subclass but
thousands of times cheaper per pair than a verification. Keypoints are cached on disk (``cache_dir``); work runs
on threads, since OpenCV releases the GIL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.errors import DataError
from multitask.files import atomic_path
from multitask.settings import GroupingParams

log = logging.getLogger(__name__)

FEATURE_VERSION = 1  # bump when extraction changes, so old cache entries are not reused
SEARCH_CHUNK_VALUES = 1 << 25  # similarities held at once (128 MB of float32)
OVERMERGED_MIN_IMAGES, OVERMERGED_SHARE = 50, 0.10  # warn about groups this large
MIN_KEYPOINTS = 20  # fewer than this and an image cannot be verified against anything


def feature_key(params: GroupingParams) -> str:
    """Short hash of the settings that change extracted keypoints (the cache folder name)."""
    text = f"orb-v{FEATURE_VERSION}-n{params.keypoints}-s{params.image_side}"
    return f"{text}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class Keypoints:
    """ORB keypoint positions and binary descriptors of one image (index 0) and of its mirror image (index 1)."""

    points: tuple[np.ndarray, np.ndarray]  # (n, 2) float32 each
    descriptors: tuple[np.ndarray, np.ndarray]  # (n, 32) uint8 each

    def __len__(self) -> int:
        return len(self.descriptors[0])


@dataclass
class GroupingResult:
    """A group id per manifest row (siblings share one), the checked candidate pairs, and the settings used."""

    groups: np.ndarray  # int64 per row, in manifest order; ids are 0.. in order of first appearance
    pairs: pd.DataFrame  # a, b (row positions), path_a, path_b, inliers, sibling
    params: GroupingParams
    featureless: list[str] = field(default_factory=list)  # images with too few keypoints to be linked
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each phase: keypoints, propose, verify

    @property
    def sibling_pairs(self) -> pd.DataFrame:
        """The verified links only."""
        return self.pairs[self.pairs["sibling"]].reset_index(drop=True)

    def known_inliers(self) -> dict[tuple[str, str], int]:
        """Every checked pair's inlier count by :func:`pair_key`: what a later check with the same settings (the
        split's audit) need not verify again."""
        return {pair_key(a, b): int(n) for a, b, n in
                zip(self.pairs["path_a"], self.pairs["path_b"], self.pairs["inliers"], strict=True)}

    def summary(self) -> dict[str, int]:
        """Counts for a log line or a report: images, groups, largest group, links, featureless images."""
        sizes = np.bincount(self.groups) if len(self.groups) else np.zeros(0, int)
        return {"images": len(self.groups), "groups": len(sizes), "largest_group": int(sizes.max(initial=0)),
                "images_with_siblings": int(sizes[sizes > 1].sum()), "candidate_pairs": len(self.pairs),
                "sibling_pairs": int(self.pairs["sibling"].sum()), "featureless": len(self.featureless)}


# ----------------------------------------------------------------------------------------------- keypoints


@contextmanager
def _opencv_single_threaded():
    """One OpenCV thread per worker: parallelism comes from our pool, not from nested OpenCV threads."""
    import cv2

    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def extract_keypoints(path: str, params: GroupingParams) -> Keypoints:
    """ORB keypoints of the image at ``path`` and of its mirror, on a ``image_side`` square greyscale copy."""
    import cv2

    gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if gray is None:
        raise DataError(f"cannot decode {path} as an image; drop it (`multitask scan --verify`) and retry")
    side = params.image_side
    shrinking = min(gray.shape) > side
    gray = cv2.resize(gray, (side, side), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    orb = cv2.ORB_create(nfeatures=params.keypoints)
    points, descriptors = [], []
    for image in (gray, np.ascontiguousarray(gray[:, ::-1])):
        found, desc = orb.detectAndCompute(image, None)
        points.append(cv2.KeyPoint_convert(found).reshape(-1, 2).astype(np.float32) if found else
                      np.zeros((0, 2), np.float32))
        descriptors.append(desc if desc is not None else np.zeros((0, 32), np.uint8))
    return Keypoints(points=tuple(points), descriptors=tuple(descriptors))


def _cache_file(cache_dir: Path, path: str, params: GroupingParams) -> Path:
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    return cache_dir / feature_key(params) / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"


def _read_cached(file: Path) -> Keypoints | None:
    """The cached keypoints in ``file``, or None when it is absent or damaged (cut short, a flipped bit, arrays of
    the wrong shapes): a cache is recomputed, never trusted."""
    try:
        with np.load(file, allow_pickle=False) as data:
            found = Keypoints(points=(data["p0"], data["p1"]), descriptors=(data["d0"], data["d1"]))
    except Exception:  # noqa: BLE001 - numpy, zipfile (BadZipFile) and zlib raise many kinds for a damaged file
        return None
    for points, descriptors in zip(found.points, found.descriptors, strict=True):
        if points.ndim != 2 or points.shape[1:] != (2,) or descriptors.ndim != 2 or len(descriptors) != len(points):
            return None
    return found


def _write_cached(file: Path, keypoints: Keypoints) -> None:
    with atomic_path(file) as tmp, open(tmp, "wb") as fh:  # a reader sees the old entry, the new one, or none
        np.savez(fh, p0=keypoints.points[0], p1=keypoints.points[1], d0=keypoints.descriptors[0],
                 d1=keypoints.descriptors[1])


def load_keypoints(
    paths: Sequence[str],
    *,
    params: GroupingParams,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> list[Keypoints]:
    """Keypoints of every path, in order: read from ``cache_dir`` when fresh, else extracted (and cached)."""
    cache = Path(cache_dir) if cache_dir else None

    def one(path: str) -> Keypoints:
        if not os.path.isfile(path):
            raise DataError(f"image {path} does not exist; restore it or make a new split with `multitask scan`")
        file = _cache_file(cache, path, params) if cache else None
        found = _read_cached(file) if file is not None and file.is_file() else None
        if found is None:
            found = extract_keypoints(path, params)
            if file is not None:
                _write_cached(file, found)
        return found

    return _parallel_map(one, paths, workers=workers)


@contextmanager
def _timer(totals: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        totals[name] += time.perf_counter() - start


def _parallel_map(fn: Callable, items: Sequence, *, workers: int | None) -> list:
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(items) < 2:
        return [fn(item) for item in items]
    with _opencv_single_threaded(), ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items, chunksize=max(1, min(64, len(items) // (4 * workers)))))


# ----------------------------------------------------------------------------------------------- propose


def word_histograms(keypoints: Sequence[Keypoints], params: GroupingParams) -> np.ndarray:
    """Mirror-invariant bag-of-words histograms (sqrt, L2-normalised), one row per image.

    Words are ``hash_bits`` fixed bits of each ORB descriptor, in ``hash_tables`` tables: a vocabulary that
    needs no training and costs microseconds per image.
    """
    positions = np.random.default_rng(0).permutation(256)[: params.hash_tables * params.hash_bits]
    positions = positions.reshape(params.hash_tables, params.hash_bits)
    weights = 1 << np.arange(params.hash_bits)
    offsets = np.arange(params.hash_tables) << params.hash_bits
    width = params.hash_tables << params.hash_bits
    histograms = np.zeros((len(keypoints), width), np.float32)
    for row, found in enumerate(keypoints):
        bits = np.unpackbits(np.concatenate(found.descriptors), axis=1)
        words = (bits[:, positions] * weights).sum(-1) + offsets
        histograms[row] = np.bincount(words.ravel(), minlength=width)
    histograms = np.sqrt(histograms)
    return histograms / np.maximum(np.linalg.norm(histograms, axis=1, keepdims=True), 1e-9)


def search_space(histograms: np.ndarray) -> np.ndarray:
    """Histograms minus their mean, L2-normalised: what all images of a subclass share no longer dominates."""
    centred = histograms - histograms.mean(axis=0, keepdims=True)
    return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-9)


def nearest(index_vectors: np.ndarray, query_vectors: np.ndarray, k: int, *, same_set: bool) -> np.ndarray:
    """(query, k) positions of the most similar unit-length index vectors; with ``same_set`` a row skips itself.

    Exact search by matrix products in chunks of queries (bounded memory): quadratic within a subclass, but a
    5,000-image subclass takes a few seconds.
    """
    k = min(k, len(index_vectors) - same_set)
    if k <= 0 or len(query_vectors) == 0:
        return np.zeros((len(query_vectors), 0), np.int64)
    found = np.empty((len(query_vectors), k), np.int64)
    chunk = max(1, SEARCH_CHUNK_VALUES // len(index_vectors))
    for start in range(0, len(query_vectors), chunk):
        similarity = query_vectors[start:start + chunk] @ index_vectors.T
        if same_set:
            rows = np.arange(len(similarity))
            similarity[rows, rows + start] = -np.inf
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1, kind="stable")
        found[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return found


def propose_pairs(keypoints: Sequence[Keypoints], params: GroupingParams) -> np.ndarray:
    """Unique candidate pairs (i < j), shape (m, 2): each image with its ``k`` most similar word histograms."""
    if len(keypoints) < 2:
        return np.zeros((0, 2), np.int64)
    vectors = search_space(word_histograms(keypoints, params))
    neighbours = nearest(vectors, vectors, params.k, same_set=True)
    rows = np.repeat(np.arange(len(keypoints)), neighbours.shape[1])
    pairs = np.stack([rows, neighbours.ravel()], axis=1)
    return np.unique(np.sort(pairs, axis=1), axis=0)


# ----------------------------------------------------------------------------------------------- verify


def count_inliers(a: Keypoints, b: Keypoints, params: GroupingParams) -> int:
    """Inliers of the best rotation+scale+shift between ``a`` and ``b``, matched in both directions: the same
    number for (a, b) and (b, a).

    The ratio test is one-sided (each of ``a``'s descriptors looks for its two nearest in ``b``), so one direction
    alone can miss a sibling pair that the other finds: lung_bnt_0020 -> lung_bnt_0021 of the real sample gives 22
    inliers, 0021 -> 0020 gives 36. The grouped split and the audit verify pairs in different orders, so a
    one-sided count let them disagree about that pair.
    """
    return max(_directed_inliers(a, b, params), _directed_inliers(b, a, params))


def _directed_inliers(a: Keypoints, b: Keypoints, params: GroupingParams) -> int:
    """Inliers of the best rotation+scale+shift that maps ``a``'s keypoints onto ``b``'s (or its mirror's).

    The mirror is skipped once the direct orientation reaches ``min_inliers``, so a sibling's count is the first
    one that passed, not necessarily the larger.
    """
    import cv2

    best = 0
    points_a, descriptors_a = a.points[0], a.descriptors[0]
    if len(descriptors_a) < 2:
        return 0
    for points_b, descriptors_b in zip(b.points, b.descriptors, strict=True):
        if len(descriptors_b) < 2:
            continue
        distance, index = cv2.batchDistance(descriptors_a, descriptors_b, cv2.CV_32S,
                                            normType=cv2.NORM_HAMMING, K=2)
        good = distance[:, 0] < params.ratio * distance[:, 1]
        if good.sum() < 3:
            continue
        _, inliers = cv2.estimateAffinePartial2D(points_a[good], points_b[index[good, 0]], method=cv2.RANSAC,
                                                 ransacReprojThreshold=params.ransac_px, maxIters=2000)
        if inliers is not None:
            best = max(best, int(inliers.sum()))
        if best >= params.min_inliers:
            break  # a sibling already: the mirror orientation cannot change the verdict
    return best


def verify_pairs(keypoints: Sequence[Keypoints], pairs: np.ndarray, params: GroupingParams, *,
                 workers: int | None = None) -> np.ndarray:
    """Inlier count of each candidate pair (int array aligned with ``pairs``)."""
    counts = _parallel_map(lambda ij: count_inliers(keypoints[ij[0]], keypoints[ij[1]], params),
                           [tuple(p) for p in pairs], workers=workers)
    return np.asarray(counts, np.int64)


# ----------------------------------------------------------------------------------------------- groups


def connected_groups(n: int, links: np.ndarray) -> np.ndarray:
    """Group id per node for undirected ``links`` (m, 2); ids number groups in order of their first node."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    links = np.asarray(links, np.int64).reshape(-1, 2)
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[labels]


def _blocks(manifest: pd.DataFrame) -> list[tuple[str, np.ndarray]]:
    """(name, row positions) of each subclass, or of all rows at once when there is no subclass column."""
    if "subclass" not in manifest.columns:
        return [("all images", np.arange(len(manifest)))]
    codes, names = pd.factorize(manifest["subclass"], sort=True)
    return [(str(name), np.flatnonzero(codes == c)) for c, name in enumerate(names)]


@dataclass
class BlockPairs:
    """Candidate pairs (global row positions) with their inlier counts, gathered over the blocks of a frame."""

    pairs: np.ndarray
    inliers: np.ndarray
    featureless: list[str]
    seconds: dict[str, float]


def pair_key(path_a: str, path_b: str) -> tuple[str, str]:
    """The key of an image pair in a ``known`` table of inlier counts: the same for (a, b) and (b, a)."""
    return (path_a, path_b) if path_a <= path_b else (path_b, path_a)


def verify_within_blocks(frame: pd.DataFrame, propose: Callable[[list[Keypoints], np.ndarray], np.ndarray], *,
                         params: GroupingParams, cache_dir: str | os.PathLike | None = None,
                         workers: int | None = None, label: str = "checking",
                         known: dict[tuple[str, str], int] | None = None) -> BlockPairs:
    """For each subclass of ``frame`` (all rows when there is no subclass column): keypoints, candidate pairs from
    ``propose(keypoints, rows)`` (local positions), and their verified inlier counts. One progress bar over the
    images; ``-v`` (debug logging) adds a line per subclass.

    ``known`` (:func:`pair_key` -> inliers) holds pairs verified before with the same ``params``: they are not
    verified again, and every newly verified pair is added to it."""
    import keras  # its progress bar only

    paths = frame["path"].astype(str).tolist()
    found_pairs, found_inliers, featureless = [], [], []
    seconds = dict.fromkeys(("keypoints", "propose", "verify"), 0.0)
    progress = keras.utils.Progbar(len(paths), unit_name="image", verbose=int(log.isEnabledFor(logging.INFO)))
    started, done = time.perf_counter(), 0
    with _opencv_single_threaded():
        for name, rows in _blocks(frame):
            with _timer(seconds, "keypoints"):
                keypoints = load_keypoints([paths[i] for i in rows], params=params, cache_dir=cache_dir,
                                           workers=workers)
            featureless += [paths[i] for i, kp in zip(rows, keypoints, strict=True) if len(kp) < MIN_KEYPOINTS]
            with _timer(seconds, "propose"):
                local = propose(keypoints, rows)
            with _timer(seconds, "verify"):
                found_inliers.append(_verify_unknown(keypoints, local, [paths[i] for i in rows], params,
                                                     known=known, workers=workers))
            found_pairs.append(rows[local] if len(local) else np.zeros((0, 2), np.int64))
            done += len(rows)
            progress.update(done)
            log.debug("%s %s (%d images): %d of %d candidate pairs verified [%d s so far]", label, name, len(rows),
                      int((found_inliers[-1] >= params.min_inliers).sum()), len(local), time.perf_counter() - started)
    pairs = np.concatenate(found_pairs) if found_pairs else np.zeros((0, 2), np.int64)
    inliers = np.concatenate(found_inliers) if found_inliers else np.zeros(0, np.int64)
    return BlockPairs(pairs=pairs, inliers=inliers, featureless=featureless, seconds=seconds)


def _verify_unknown(keypoints: Sequence[Keypoints], pairs: np.ndarray, paths: list[str], params: GroupingParams, *,
                    known: dict[tuple[str, str], int] | None, workers: int | None) -> np.ndarray:
    """:func:`verify_pairs`, taking the counts of pairs already in ``known`` from there (and adding the new ones)."""
    if known is None:
        return verify_pairs(keypoints, pairs, params, workers=workers)
    keys = [pair_key(paths[a], paths[b]) for a, b in pairs]
    new = np.array([key not in known for key in keys], bool)
    if new.any():
        known.update(zip([k for k, n in zip(keys, new, strict=True) if n],
                         verify_pairs(keypoints, pairs[new], params, workers=workers).tolist(), strict=True))
    return np.array([known[key] for key in keys], np.int64)


def find_sibling_groups(manifest: pd.DataFrame, *, params: GroupingParams | None = None,
                        cache_dir: str | os.PathLike | None = None, workers: int | None = None) -> GroupingResult:
    """Group id per row of ``manifest`` (needs ``path``; candidates stay within ``subclass`` when present)."""
    if "path" not in manifest.columns:
        raise DataError("the manifest has no 'path' column; expected one image path per row")
    params = params or GroupingParams()
    paths = manifest["path"].astype(str).tolist()
    log.info("finding augmented siblings among %d images (ORB + RANSAC, within each subclass)", len(paths))
    found = verify_within_blocks(manifest, lambda keypoints, rows: propose_pairs(keypoints, params), params=params,
                                 cache_dir=cache_dir, workers=workers, label="siblings of")
    pairs, inliers = found.pairs, found.inliers
    sibling = inliers >= params.min_inliers
    if found.featureless:
        log.warning("%d image(s) have fewer than %d keypoints and cannot be linked to siblings (first: %s)",
                    len(found.featureless), MIN_KEYPOINTS, found.featureless[0])
    frame = pd.DataFrame({"a": pairs[:, 0], "b": pairs[:, 1], "path_a": [paths[i] for i in pairs[:, 0]],
                          "path_b": [paths[i] for i in pairs[:, 1]], "inliers": inliers, "sibling": sibling})
    result = GroupingResult(groups=connected_groups(len(paths), pairs[sibling]), pairs=frame, params=params,
                            featureless=found.featureless, seconds=found.seconds)
    log.info("sibling groups: %s", result.summary())
    _warn_if_overmerged(manifest, result.groups)
    return result


def _warn_if_overmerged(manifest: pd.DataFrame, groups: np.ndarray) -> None:
    """Log when one group holds a large share of its subclass: false links chain, and whole classes merge."""
    sizes = np.bincount(groups)
    block = manifest["subclass"].to_numpy() if "subclass" in manifest.columns else np.full(len(groups), "the set")
    for g in np.flatnonzero(sizes >= OVERMERGED_MIN_IMAGES):
        members = np.flatnonzero(groups == g)
        share = len(members) / np.sum(block == block[members[0]])
        if share > OVERMERGED_SHARE:
            log.warning("one sibling group holds %d images (%.0f%% of %s, e.g. %s); if they are not all augmented "
                        "copies of one source, raise min_inliers and check with `multitask audit-split`",
                        len(members), 100 * share, block[members[0]], manifest["path"].iloc[members[0]])
