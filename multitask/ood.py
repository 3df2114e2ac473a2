"""Out-of-distribution detection: a score, computed inside the inference graph, of how unlike the training images
an input is.

Method (measured on the real sample with ``scripts/measure_ood.py``: a frozen pretrained run at 160 px, 416
training, 90 validation and 87 test images, 60 generated foreign images of 10 kinds from ``tests/foreign.py``):
the score below flags 95% of the foreign images (57/60) and 1.1% of the test images (1/87), AUROC 0.998. The
choices, each compared on the same features with the threshold at the 99th percentile of validation:

    blocks                               foreign flagged   test flagged   AUROC
    mixed10 (final pooled features)           12%               0%         0.74
    mixed0 alone                              97%               2.3%       0.997
    mixed0 + mixed2 + mixed5                  93%               1.1%       0.998
    pixels + mixed0 + mixed2 + mixed5         95%               1.1%       0.998   <- this module
    the same with one mean (not per organ)    95%               2.3%       0.997
    the same combined by max, not sum         97%               2.3%

The misses are CT-like phantoms (grey ellipses on black: close to the brain MRI slices) and a wood-grain texture.

* **Blocks.** The input is described by four small feature vectors: global-average-pooled outputs of the early and
  middle Inception blocks ``mixed0`` (256), ``mixed2`` (288) and ``mixed5`` (768), and three pixel statistics of
  the scaled input image (:class:`PixelStatistics`). The final pooled features (``mixed10``) are left out on
  purpose: on a 9-organ run they flagged only 12-21% of foreign images (kNN and Mahalanobis), because the
  pretrained top of the network maps anything to "some object"; early blocks describe texture and colour, which
  is what tells a stained slide or an MRI slice from a chart or a photograph (``mixed0`` alone: AUROC 0.97).
* **Per block, a Mahalanobis distance** (Lee et al., 2018) to the training images: each feature is standardised
  by its training mean and a shrunk spread (as :func:`multitask.model.fit_feature_scaling` does, so a channel that
  is dead on every training image cannot divide by ~0), and the covariance is Ledoit-Wolf shrunk (scikit-learn),
  which stays well conditioned with a few hundred images and 768 features. The distance is to the nearest of the
  training ORGANS' means under one shared covariance (class-conditional, as Lee et al.), because the training
  images are a mixture (grey MRI slices, pink histology, blood smears) that one mean would describe badly.
* **Combined by a sum of standardised distances.** Each block's distance is centred and scaled by its distribution
  on HELD-OUT training images (5-fold cross-fitting: a distance is measured by a detector fitted without that
  image), so every block contributes on the same scale and in-sample optimism (a training image is always close
  to a covariance fitted on itself) does not set the scale. A sum, not a maximum, lets a large deviation in any one
  block carry the score while small deviations of an in-distribution image in several blocks do not add up to much.
* **Pixel statistics** catch what the features miss (the probe's misses were a black image, noise, a gradient, a
  starfield): the log standard deviation of the pixels (a blank or near-constant image has ~0), the log of
  the mean absolute difference between neighbouring pixels relative to that spread (noise ~1, a smooth gradient
  ~0.01) and the mean saturation (charts, screenshots and scenes use saturated colours that stains do not).

``ood_score`` is that sum; a run flags an image when it exceeds ``threshold``, the 99th percentile of the
validation images' scores (about 1% of in-distribution images are flagged by design).

Everything in the graph is a built-in layer (``GlobalAveragePooling2D``) or one of two small layers registered
here that use ``keras.ops`` only, with every statistic held as a constant weight: the inference graph loads under
``safe_mode=True`` and exports to ONNX with the image as its only input. The detector itself is stored in the run
as ``ood.json`` (settings, per-block centring and scale, the threshold) and ``ood.npz`` (means and whitening
matrices), both written atomically.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from keras import ops

from multitask.errors import RunError
from multitask.features import backbone_precision, weights_fingerprint
from multitask.files import atomic_path, write_json
from multitask.rundir import OOD_ARRAYS_FILE as ARRAYS_FILE

log = logging.getLogger(__name__)

PIXELS = "pixels"  # the block of pixel statistics
PIXEL_LAYER = "inception_scaling"  # the backbone's first layer: the image scaled to [-1, 1]
FEATURE_LAYERS = ("mixed0", "mixed2", "mixed5")
METHOD = "class-conditional Mahalanobis (Ledoit-Wolf) per block, standardised by cross-fitted distances, summed"
FORMAT = 1
VARIANCE_SHRINKAGE = 0.1  # as multitask.model.VARIANCE_SHRINKAGE: a dead feature is amplified at most ~3x
LOG_FLOOR = 1e-3  # pixel statistics are logs of values >= 0: an exactly constant image must stay finite
FOLDS = 5
MAX_FIT_IMAGES = 3000  # a larger training split is sampled (seeded): more adds little to 768-feature covariances
MIN_FIT_IMAGES = 2 * FOLDS
MIN_GROUP = 5  # a group (organ) with fewer training images shares the overall mean instead of having its own


# ----------------------------------------------------------------------------------------------- graph layers


@keras.saving.register_keras_serializable(package="multitask")
class PixelStatistics(keras.layers.Layer):
    """(N, H, W, 3) image in [-1, 1] -> (N, 3): log spread, log relative neighbour difference, saturation."""

    def call(self, image):
        spread = ops.std(image, axis=(1, 2, 3))
        across = ops.mean(ops.abs(image[:, 1:, :, :] - image[:, :-1, :, :]), axis=(1, 2, 3))
        down = ops.mean(ops.abs(image[:, :, 1:, :] - image[:, :, :-1, :]), axis=(1, 2, 3))
        neighbours = 0.5 * (across + down)
        saturation = ops.mean(ops.max(image, axis=-1) - ops.min(image, axis=-1), axis=(1, 2))
        return ops.stack([ops.log(spread + LOG_FLOOR), ops.log((neighbours + LOG_FLOOR) / (spread + LOG_FLOOR)),
                          saturation], axis=-1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 3)


@keras.saving.register_keras_serializable(package="multitask")
class OodScore(keras.layers.Layer):
    """Block features (a list, one (N, D_b) tensor per block) -> (N,) score: the sum over blocks of
    ``(min_k ||(x - mean_k) @ whiten|| - centre) / scale`` (see :class:`OodDetector`). The statistics are weights
    (set from a fitted detector), the sizes are the config: ``dims`` per block, ``groups`` means per block."""

    def __init__(self, dims: Sequence[int], groups: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.dims, self.groups = [int(d) for d in dims], [int(g) for g in groups]
        for b, (dim, group) in enumerate(zip(self.dims, self.groups, strict=True)):
            setattr(self, f"mean_{b}", self.add_weight(shape=(group, dim), initializer="zeros", trainable=False,
                                                       name=f"mean_{b}"))
            setattr(self, f"whiten_{b}", self.add_weight(shape=(dim, dim), initializer="identity",
                                                         trainable=False, name=f"whiten_{b}"))
        self.centre = self.add_weight(shape=(len(self.dims),), initializer="zeros", trainable=False, name="centre")
        self.scale = self.add_weight(shape=(len(self.dims),), initializer="ones", trainable=False, name="scale")
        self.built = True

    def call(self, blocks):
        total = 0.0
        for b, x in enumerate(blocks):
            mean, whiten = getattr(self, f"mean_{b}"), getattr(self, f"whiten_{b}")
            offsets = ops.expand_dims(x, 1) - ops.expand_dims(mean, 0)  # (N, groups, D)
            squared = ops.sum(ops.square(ops.matmul(offsets, whiten)), axis=-1)  # (N, groups)
            distance = ops.sqrt(ops.min(squared, axis=-1))
            total = total + (distance - self.centre[b]) / self.scale[b]
        return total

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0],)

    def get_config(self):
        return {**super().get_config(), "dims": self.dims, "groups": self.groups}


# ----------------------------------------------------------------------------------------------- the detector


@dataclass
class Block:
    """One block's fitted statistics: group means and whitening (standardisation folded in), and the centre and
    scale of its held-out distances."""

    name: str
    means: np.ndarray  # (groups, D) in the block's raw feature units
    whiten: np.ndarray  # (D, D): ||(x - mean) @ whiten|| is the Mahalanobis distance
    centre: float = 0.0
    scale: float = 1.0

    def distance(self, features: np.ndarray) -> np.ndarray:
        offsets = np.asarray(features, np.float64)[:, None, :] - self.means[None]
        return np.sqrt(np.min(np.sum(np.square(offsets @ self.whiten), axis=-1), axis=-1))


@dataclass
class OodDetector:
    """A fitted out-of-distribution detector (see the module docstring); ``threshold`` flags ``score > threshold``."""

    blocks: list[Block]
    threshold: float | None = None
    info: dict = field(default_factory=dict)  # how it was fitted: images, folds, groups

    # ------------------------------------------------------------------------------------- in the graph

    @property
    def block_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def layers(self) -> tuple[str, ...]:
        """The backbone layers the graph taps."""
        return tuple(PIXEL_LAYER if name == PIXELS else name for name in self.block_names)

    def taps(self, backbone: keras.Model) -> dict:
        """The outputs of :attr:`layers` in ``backbone``, by layer name."""
        return tapped_outputs(backbone, self.layers)

    def graph_score(self, tapped: Mapping) -> keras.KerasTensor:
        """The (N,) ``ood_score`` computed in the graph from the tapped layers' outputs."""
        features = block_features(tapped, self.block_names)
        layer = OodScore([b.whiten.shape[0] for b in self.blocks], [len(b.means) for b in self.blocks],
                         name="ood_score")
        weights = [w for b in self.blocks for w in (b.means, b.whiten)]
        weights += [np.array([b.centre for b in self.blocks]), np.array([b.scale for b in self.blocks])]
        layer.set_weights([np.asarray(w, np.float32) for w in weights])
        return layer([features[name] for name in self.block_names])

    # ------------------------------------------------------------------------------------- in numpy

    def score(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Scores of block features (from :func:`feature_model`), float64, as the graph computes them."""
        return sum((b.distance(features[b.name]) - b.centre) / b.scale for b in self.blocks)

    def block_scores(self, features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each block's standardised distance (the terms of :meth:`score`)."""
        return {b.name: (b.distance(features[b.name]) - b.centre) / b.scale for b in self.blocks}

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray], *, groups: np.ndarray | None = None, folds: int = FOLDS,
            seed: int = 0) -> tuple[OodDetector, np.ndarray]:
        """Fit on training images' block features (``{block: (n, D)}``), optionally with a group (organ) per image;
        returns the detector and the cross-fitted (held-out) scores of those images."""
        names = tuple(features)
        n = len(next(iter(features.values())))
        if n < 2 * folds:
            raise ValueError(f"the OOD detector needs at least {2 * folds} training images, got {n}")
        groups = _usable_groups(groups, n)
        fold = np.random.default_rng(seed).permutation(n) % folds
        held_out = {name: np.zeros(n) for name in names}
        for k in range(folds):
            inside = fold != k
            for name in names:
                block = fit_block(name, features[name][inside], groups[inside])
                held_out[name][~inside] = block.distance(features[name][~inside])
        blocks = []
        for name in names:
            block = fit_block(name, features[name], groups)
            block.centre = float(np.median(held_out[name]))
            spread = np.subtract(*np.percentile(held_out[name], [75, 25])) / 1.349  # IQR of a normal -> its sigma
            block.scale = float(max(spread, 1e-6 * max(abs(block.centre), 1.0)))
            blocks.append(block)
        detector = cls(blocks, info={"fit_images": n, "folds": folds, "groups": int(len(np.unique(groups)))})
        scores = sum((held_out[b.name] - b.centre) / b.scale for b in blocks)
        return detector, scores

    # ------------------------------------------------------------------------------------- files

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (ood.json: settings, centres, scales, threshold) and ood.npz beside it, atomically."""
        path = Path(path)
        arrays = {f"{b.name}.{kind}": getattr(b, kind).astype(np.float32) for b in self.blocks
                  for kind in ("means", "whiten")}
        with atomic_path(path.with_name(ARRAYS_FILE)) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        record = {"format": FORMAT, "method": METHOD, "layers": list(self.layers), "threshold": self.threshold,
                  "arrays": ARRAYS_FILE, **self.info,
                  "blocks": [{"name": b.name, "dim": int(b.whiten.shape[0]), "groups": len(b.means),
                              "centre": b.centre, "scale": b.scale} for b in self.blocks]}
        return write_json(record, path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> OodDetector:
        """Read a detector written by :meth:`to_json`; RunError when either file is missing or damaged."""
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            arrays_path = path.with_name(record.get("arrays", ARRAYS_FILE))
            with np.load(arrays_path, allow_pickle=False) as arrays:
                blocks = [Block(b["name"], np.asarray(arrays[f"{b['name']}.means"], np.float64),
                                np.asarray(arrays[f"{b['name']}.whiten"], np.float64), float(b["centre"]),
                                float(b["scale"])) for b in record["blocks"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"{path} (with {ARRAYS_FILE} beside it) is not a readable OOD detector "
                           f"({type(exc).__name__}: {str(exc)[:160]}); retrain the run, or delete both files to "
                           "predict without OOD scores") from None
        info = {k: record[k] for k in ("fit_images", "folds", "groups") if k in record}
        threshold = record.get("threshold")
        return cls(blocks, threshold=None if threshold is None else float(threshold), info=info)


def fit_block(name: str, features: np.ndarray, groups: np.ndarray) -> Block:
    """Group means and a shared Ledoit-Wolf covariance of standardised ``features``, as a whitening matrix."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, np.float64)
    mean, variance = x.mean(axis=0), x.var(axis=0)
    spread = np.sqrt(variance + VARIANCE_SHRINKAGE * max(variance.mean(), 1e-30))
    z = (x - mean) / spread
    labels = np.unique(groups)
    centres = np.stack([z[groups == g].mean(axis=0) for g in labels])
    residual = z - centres[np.searchsorted(labels, groups)]
    covariance = LedoitWolf(assume_centered=True).fit(residual).covariance_
    values, vectors = np.linalg.eigh(covariance)
    values = np.maximum(values, 1e-6 * values.max())
    whiten = (vectors / np.sqrt(values)) / spread[:, None]  # diag(1/spread) @ V @ diag(1/sqrt(lambda))
    return Block(name, centres * spread + mean, whiten)


def _usable_groups(groups: np.ndarray | None, n: int) -> np.ndarray:
    """Groups as small integers; groups too small for a mean of their own are merged into one "rest" group."""
    if groups is None:
        return np.zeros(n, np.int64)
    _, codes, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    small = counts[codes] < MIN_GROUP
    codes = np.where(small, -1, codes)
    return np.unique(codes, return_inverse=True)[1].reshape(-1)


# ----------------------------------------------------------------------------------------------- features


def tapped_outputs(backbone: keras.Model, layers: Sequence[str]) -> dict:
    """``{layer name: that layer's output tensor}`` in ``backbone``."""
    return {name: backbone.get_layer(name).output for name in layers}


def block_features(tapped: Mapping, blocks: Sequence[str]) -> dict:
    """Per block, the (N, D) feature tensor from the tapped layers: pooled maps, or the pixel statistics."""
    features = {}
    for name in blocks:
        if name == PIXELS:
            features[name] = PixelStatistics(name="ood_pixel_statistics")(tapped[PIXEL_LAYER])
        else:
            features[name] = keras.layers.GlobalAveragePooling2D(name=f"ood_pooled_{name}")(tapped[name])
    return features


def feature_model(backbone: keras.Model, blocks: Sequence[str] = (PIXELS, *FEATURE_LAYERS)) -> keras.Model:
    """Image (0..255) -> ``{block: (N, D) features}``: what the detector is fitted on, computed as the graph does."""
    layers = [PIXEL_LAYER if name == PIXELS else name for name in blocks]
    return keras.Model(backbone.input, block_features(tapped_outputs(backbone, layers), blocks),
                       name="ood_features")


def extract(model: keras.Model, paths: Sequence[str], *, image_size: int,
            batch_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Block features (float64, as the detector is fitted) of every file that decodes, and the positions of those
    files in ``paths`` (:func:`multitask.features.model_outputs`)."""
    from multitask.features import model_outputs

    blocks, rows = model_outputs(model, paths, image_size=image_size, batch_size=batch_size)
    return {name: values.astype(np.float64) for name, values in blocks.items()}, rows


# ----------------------------------------------------------------------------------------------- fitting in train


def fit_run_detector(backbone: keras.Model, split, *, image_size: int, batch_size: int, seed: int,
                     out: str | os.PathLike, computed: Computed | None = None) -> dict | None:
    """Fit the detector on a run's training images (at most MAX_FIT_IMAGES, sampled with ``seed``), threshold it at
    the 99th percentile of its validation images' scores, write it to ``out`` (ood.json, ood.npz beside it) and
    return the record for config.json; None, with a warning, when too few training images decode.

    ``computed`` holds block features (:func:`feature_model`'s outputs) from an earlier pass: training's feature
    pass (:class:`multitask.train.Trainer`). They are used, instead of a pass of their own, when the layers they
    tap are bit for bit this backbone's, at its precision (:func:`taps_identity`; fine-tuning from a later block
    leaves them frozen), and they cover every image chosen here; the record says which (``features_from``).

    Without validation images the threshold is the 99th percentile of the cross-fitted training scores: each is
    the score of an image the detector was fitted without, so it is the nearest honest stand-in."""
    train, val = (_sample(split[split["split"] == name], MAX_FIT_IMAGES, seed) for name in ("train", "val"))
    paths = train["path"].tolist() + val["path"].tolist()
    taps = feature_model(backbone)
    usable = computed is not None and computed.source == taps_identity(backbone, taps)
    known = computed.lookup(paths) if usable else None
    if known is not None:
        features, rows = known
    else:
        features, rows = extract(taps, paths, image_size=image_size, batch_size=batch_size)
    is_train = rows < len(train)
    if is_train.sum() < MIN_FIT_IMAGES:
        log.warning("only %d training images decode: no out-of-distribution detector (it needs %d)",
                    int(is_train.sum()), MIN_FIT_IMAGES)
        return None
    organs = train["organ"].to_numpy()[rows[is_train]]
    detector, held_out = OodDetector.fit({k: v[is_train] for k, v in features.items()}, groups=organs, seed=seed)
    if (~is_train).any():
        threshold, source = np.percentile(detector.score({k: v[~is_train] for k, v in features.items()}), 99), "val"
    else:
        log.warning("no validation images: the OOD threshold is the 99th percentile of cross-fitted training scores "
                    "(each from a detector fitted without that image), which may flag more or fewer than 1%% of new "
                    "in-distribution images")
        threshold, source = np.percentile(held_out, 99), "train (cross-fitted)"
    detector.threshold = float(threshold)
    detector.to_json(out)
    log.info("OOD detector fitted on %d training images; threshold %.3g (99th percentile of %s scores)",
             int(is_train.sum()), detector.threshold, source)
    return {"threshold": detector.threshold, "layers": list(detector.layers), "method": METHOD,
            "fit_images": int(is_train.sum()), "threshold_images": int((~is_train).sum() or is_train.sum()),
            "threshold_source": source, "percentile": 99,
            "features_from": "the training feature pass" if known is not None else "a pass of its own"}


def taps_identity(backbone: keras.Model, taps: keras.Model | None = None) -> tuple[str, str]:
    """What block features computed through ``taps`` (``backbone``'s :func:`feature_model`) depend on: the SHA-256
    of its weights and the precision ``backbone`` computes in."""
    return weights_fingerprint(taps or feature_model(backbone)), backbone_precision(backbone)


@dataclass
class Computed:
    """Block features already computed: ``blocks[name][i]`` belongs to ``paths[rows[i]]`` (files that did not
    decode have no row); ``source`` is the :func:`taps_identity` of the layers that computed them."""

    paths: Sequence[str]
    blocks: Mapping[str, np.ndarray]
    rows: np.ndarray
    source: tuple[str, str]

    def lookup(self, paths: Sequence[str]) -> tuple[dict[str, np.ndarray], np.ndarray] | None:
        """As :func:`extract` on ``paths`` would answer (features of the files that decode, their positions), or
        None when a block is missing or a path was never seen."""
        if set(self.blocks) != {PIXELS, *FEATURE_LAYERS}:
            return None
        position = {path: i for i, path in enumerate(self.paths)}
        if any(path not in position for path in paths):
            return None
        row_of = np.full(len(self.paths), -1)
        row_of[np.asarray(self.rows, np.int64)] = np.arange(len(self.rows))
        picked = row_of[[position[path] for path in paths]]
        decoded = np.flatnonzero(picked >= 0)
        return {name: np.asarray(v[picked[decoded]], np.float64) for name, v in self.blocks.items()}, decoded


def _sample(rows, n: int, seed: int):
    """At most ``n`` of ``rows``, chosen with ``seed`` and kept in their order."""
    if len(rows) <= n:
        return rows.reset_index(drop=True)
    chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    return rows.iloc[chosen].reset_index(drop=True)
