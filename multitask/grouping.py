"""Find augmented siblings of one source image, so a split can keep them together; audit any split for leakage.

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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from multitask.errors import DataError
from multitask.files import atomic_path

log = logging.getLogger(__name__)

SPLIT_ORDER = ("train", "val", "test")
FEATURE_VERSION = 1  # bump when extraction changes, so old cache entries are not reused
SEARCH_CHUNK_VALUES = 1 << 25  # similarities held at once (128 MB of float32)
OVERMERGED_MIN_IMAGES, OVERMERGED_SHARE = 50, 0.10  # warn about groups this large
MIN_KEYPOINTS = 20  # fewer than this and an image cannot be verified against anything


@dataclass(frozen=True)
class GroupingParams:
    """Every setting of sibling detection, with its default (see the README for why these values)."""

    k: int = 8  # candidates per image
    min_inliers: int = 30  # unrelated images of one class reach ~11-27 inliers; most siblings 40-300
    keypoints: int = 500  # ORB features per orientation
    image_side: int = 256  # images are resized to this square before detection
    ratio: float = 0.8  # Lowe's ratio test
    ransac_px: float = 4.0  # RANSAC reprojection threshold, in pixels at image_side
    hash_tables: int = 2  # bag of words: tables of hash_bits sampled descriptor bits each
    hash_bits: int = 12

    def __post_init__(self):
        problems = [f"{name} must be at least {low}, got {getattr(self, name)}" for name, low in
                    (("k", 1), ("min_inliers", 3), ("keypoints", 10), ("image_side", 64), ("hash_tables", 1),
                     ("hash_bits", 4)) if getattr(self, name) < low]
        if self.hash_bits > 16:
            problems.append(f"hash_bits must be at most 16, got {self.hash_bits}")
        if not 0 < self.ratio < 1:
            problems.append(f"ratio must be between 0 and 1, got {self.ratio}")
        if problems:
            raise DataError("invalid grouping settings: " + "; ".join(problems))

    def feature_key(self) -> str:
        """Short hash of the settings that change extracted keypoints (the cache folder name)."""
        text = f"orb-v{FEATURE_VERSION}-n{self.keypoints}-s{self.image_side}"
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
    return cache_dir / params.feature_key() / f"{hashlib.sha1(key.encode()).hexdigest()}.npz"


def _read_cached(file: Path) -> Keypoints | None:
    try:
        with np.load(file) as data:
            return Keypoints(points=(data["p0"], data["p1"]), descriptors=(data["d0"], data["d1"]))
    except (OSError, KeyError, ValueError):  # absent, or damaged by a crash: recompute
        return None


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


def _search_space(histograms: np.ndarray) -> np.ndarray:
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
    vectors = _search_space(word_histograms(keypoints, params))
    neighbours = nearest(vectors, vectors, params.k, same_set=True)
    rows = np.repeat(np.arange(len(keypoints)), neighbours.shape[1])
    pairs = np.stack([rows, neighbours.ravel()], axis=1)
    return np.unique(np.sort(pairs, axis=1), axis=0)


# ----------------------------------------------------------------------------------------------- verify


def count_inliers(a: Keypoints, b: Keypoints, params: GroupingParams) -> int:
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


def find_sibling_groups(
    manifest: pd.DataFrame,
    *,
    k: int = GroupingParams.k,
    min_inliers: int = GroupingParams.min_inliers,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    params: GroupingParams | None = None,
) -> GroupingResult:
    """Group id per row of ``manifest`` (needs ``path``; candidates stay within ``subclass`` when present).

    ``params``, when given, overrides ``k`` and ``min_inliers``.
    """
    if "path" not in manifest.columns:
        raise DataError("the manifest has no 'path' column; expected one image path per row")
    params = params or GroupingParams(k=k, min_inliers=min_inliers)
    paths = manifest["path"].astype(str).tolist()
    all_pairs, all_inliers, featureless = [], [], []
    seconds = dict.fromkeys(("keypoints", "propose", "verify"), 0.0)
    started = time.perf_counter()
    with _opencv_single_threaded():
        for name, rows in _blocks(manifest):
            with _timer(seconds, "keypoints"):
                keypoints = load_keypoints([paths[i] for i in rows], params=params, cache_dir=cache_dir,
                                           workers=workers)
            featureless += [paths[i] for i, kp in zip(rows, keypoints, strict=True) if len(kp) < MIN_KEYPOINTS]
            with _timer(seconds, "propose"):
                local = propose_pairs(keypoints, params)
            with _timer(seconds, "verify"):
                all_inliers.append(verify_pairs(keypoints, local, params, workers=workers))
            all_pairs.append(rows[local] if len(local) else np.zeros((0, 2), np.int64))
            log.info("siblings of %s (%d images): %d of %d candidate pairs verified [%d s so far]", name, len(rows),
                     int((all_inliers[-1] >= params.min_inliers).sum()), len(local), time.perf_counter() - started)
    pairs = np.concatenate(all_pairs) if all_pairs else np.zeros((0, 2), np.int64)
    inliers = np.concatenate(all_inliers) if all_inliers else np.zeros(0, np.int64)
    sibling = inliers >= params.min_inliers
    if featureless:
        log.warning("%d image(s) have fewer than %d keypoints and cannot be linked to siblings (first: %s)",
                    len(featureless), MIN_KEYPOINTS, featureless[0])
    frame = pd.DataFrame({"a": pairs[:, 0], "b": pairs[:, 1], "path_a": [paths[i] for i in pairs[:, 0]],
                          "path_b": [paths[i] for i in pairs[:, 1]], "inliers": inliers, "sibling": sibling})
    result = GroupingResult(groups=connected_groups(len(paths), pairs[sibling]), pairs=frame, params=params,
                            featureless=featureless, seconds=seconds)
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


# ----------------------------------------------------------------------------------------------- audit


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
    return [s for s in SPLIT_ORDER if s in present] + sorted(present - set(SPLIT_ORDER))


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


def audit_split(
    frame: pd.DataFrame,
    *,
    k: int = GroupingParams.k,
    min_inliers: int = GroupingParams.min_inliers,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    params: GroupingParams | None = None,
) -> SplitAudit:
    """Find near-duplicates across the splits of ``frame`` (``path``, ``split``, optional ``subclass``).

    Each image of a later split (val, test) is checked against its ``k`` most similar images of every earlier
    split (train; train and val), within its subclass when the frame has one.
    """
    missing = [c for c in ("path", "split") if c not in frame.columns]
    if missing:
        raise DataError(f"the split table has no {', '.join(missing)} column(s); expected path and split")
    params = params or GroupingParams(k=k, min_inliers=min_inliers)
    paths, split = frame["path"].astype(str).tolist(), frame["split"].astype(str).to_numpy(object)
    names = _split_names(split)
    found_pairs, found_inliers = [], []
    with _opencv_single_threaded():
        for _, rows in _blocks(frame):
            keypoints = load_keypoints([paths[i] for i in rows], params=params, cache_dir=cache_dir,
                                       workers=workers)
            local = _cross_split_candidates(keypoints, split[rows], names, params)
            found_inliers.append(verify_pairs(keypoints, local, params, workers=workers))
            found_pairs.append(rows[local] if len(local) else np.zeros((0, 2), np.int64))
    pairs = np.concatenate(found_pairs) if found_pairs else np.zeros((0, 2), np.int64)
    inliers = np.concatenate(found_inliers) if found_inliers else np.zeros(0, np.int64)
    return _audit_from_pairs(paths, split, names, pairs, inliers, params)


def _cross_split_candidates(keypoints: Sequence[Keypoints], split: np.ndarray, names: list[str],
                            params: GroupingParams) -> np.ndarray:
    """(m, 2) local pairs (earlier split, later split): each later image with its k nearest earlier ones."""
    if len(keypoints) < 2 or len(names) < 2:
        return np.zeros((0, 2), np.int64)
    vectors = _search_space(word_histograms(keypoints, params))
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
    """A split CSV from any tool: needs ``path`` and ``split`` columns; relative paths resolve against its folder."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; pass a CSV with path and split columns")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ("path", "split") if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected at least path and split "
                        f"(found {', '.join(frame.columns)})")
    frame = frame.copy()
    frame["path"] = [p if os.path.isabs(p) or os.path.exists(p) else str(path.parent / p) for p in frame["path"]]
    gone = [p for p in frame["path"] if not os.path.isfile(p)]
    if gone:
        raise DataError(f"{path}: {len(gone)} of {len(frame)} listed images do not exist (first: {gone[0]}); "
                        "restore them or fix the paths")
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def write_audit(audit: SplitAudit, out_dir: str | os.PathLike, *, examples: int = 8) -> dict[str, Path]:
    """Write ``audit.json`` (counts, worst pairs) and ``audit_pairs.png`` (contact sheet) into ``out_dir``."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "audit.json"
    tmp = report.with_name(f".{report.name}.tmp")
    tmp.write_text(json.dumps(audit.to_json(examples=max(examples, 20)), indent=2, default=_json_default))
    os.replace(tmp, report)
    return {"report": report, "contact_sheet": draw_contact_sheet(audit.pairs, out / "audit_pairs.png",
                                                                  max_pairs=examples)}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
