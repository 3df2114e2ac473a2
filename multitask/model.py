"""Backbone, heads, and the joint / single-task models built from them. Nothing about files or data.

The backbone ends at pooled features (keras-hub style): raw RGB pixels in 0..255 -> InceptionV3's own scaling
to [-1, 1], applied **once** by a built-in ``Rescaling`` layer (the research seed scaled twice) -> InceptionV3
without its top -> global average pooling -> per-feature standardisation fitted on the training images (a
built-in ``Normalization`` layer). The heads keep the seed's top, one per task:
Dense(256, relu) -> Dropout(0.2) -> Dense(n) logits. The pooled features are computed once and shared by
both heads, so a joint forward pass costs one backbone plus two small heads.

The joint (or single-task) model is ``image -> backbone -> heads`` with both parts kept as named sub-models
(keras-hub style: a Backbone that ends at features, a Task that adds heads). Code that needs a part asks for it
with :func:`model_parts`, which is the only place that knows the parts' names; the tasks a model answers are
the keys of its heads' output dict (:func:`model_tasks`).

Only built-in layers are used, so a saved ``.keras`` file loads with ``keras.models.load_model`` under the
default ``safe_mode=True`` without any custom-object registration.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from multitask.errors import ModelError
from multitask.settings import MIN_IMAGE_SIZE
from multitask.taxonomy import CANCER_LABELS, ORGAN_LABELS, TASKS

BACKBONE, HEADS = "backbone", "heads"  # the sub-models of every model built here
POOLED, FEATURE_SCALING = "features", "feature_scaling"  # the backbone's last two layers
FEATURE_DIM = 2048
NUM_CLASSES = {"organ": len(ORGAN_LABELS), "cancer": len(CANCER_LABELS)}
HEAD_UNITS = 256
HEAD_DROPOUT = 0.2
# Feature scaling: each feature's variance is shrunk toward the mean variance by this share (see fit_feature_scaling).
VARIANCE_SHRINKAGE = 0.1


def resolve_weights(weights: str | os.PathLike | None) -> str | None:
    """Normalise the ``weights`` option: "imagenet", None (also "none"), or an existing weights file path."""
    if weights is None or str(weights).lower() == "none":
        return None
    if str(weights) == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist; {WEIGHTS_HINT}")
    hdf5 = is_hdf5(path)
    if not hdf5 or path.suffix.lower() not in (".h5", ".hdf5"):  # checked before a 100 MB model is built
        found = f"an HDF5 file named {path.name}" if hdf5 else "a file without the HDF5 signature"
        raise ModelError(f"{path} is not InceptionV3 weights: expected an HDF5 file named *.h5, found {found}; "
                         f"{WEIGHTS_HINT}")
    return str(path)


WEIGHTS_HINT = ("pass $weights=imagenet (downloads once), $weights=none (random initialisation), or the path of "
                "InceptionV3 'notop' weights (inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5)")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HDF5_SIGNATURE_OFFSETS = (0, 512, 1024, 2048)  # the superblock may follow a user block of 512 * 2**k bytes


def is_hdf5(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts (or, after a user block, continues) with the HDF5 signature; reads a few bytes."""
    with open(path, "rb") as fh:
        for offset in HDF5_SIGNATURE_OFFSETS:
            fh.seek(offset)
            if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                return True
    return False


def build_backbone(image_size: int = 256, weights: str | os.PathLike | None = "imagenet") -> keras.Model:
    """Model from raw RGB pixels (0..255) to pooled InceptionV3 features of shape (FEATURE_DIM,)."""
    if image_size < MIN_IMAGE_SIZE:
        raise ModelError(f"image size {image_size} is too small: InceptionV3 needs at least {MIN_IMAGE_SIZE} px")
    weights = resolve_weights(weights)
    image = keras.Input((image_size, image_size, 3), name="image")
    # keras.applications.inception_v3.preprocess_input is x / 127.5 - 1: the same map as this layer.
    scaled = keras.layers.Rescaling(scale=1.0 / 127.5, offset=-1.0, name="inception_scaling")(image)
    try:
        inception = keras.applications.InceptionV3(include_top=False, weights=weights, input_tensor=scaled)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:  # h5py and keras on a file of other weights
        if weights in (None, "imagenet"):
            raise
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"{weights} is not InceptionV3 'notop' weights: keras could not load it "
                         f"({type(exc).__name__}: {first_line}); {WEIGHTS_HINT}") from exc
    except Exception as exc:  # keras raises a bare Exception on a failed download
        if weights != "imagenet" or "fetch failure" not in str(exc).lower():
            raise
        raise ModelError(
            f"could not download the ImageNet weights of InceptionV3 ({str(exc)[:160]}). Use $weights=none to "
            "train from random initialisation, or download "
            "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5 once on a machine with internet and "
            "pass $weights=PATH"
        ) from exc
    # float32 whatever the dtype policy (multitask.accelerate): the mean of 2,048 maps, and a standardisation that
    # subtracts means ~1e-4 apart in a random-init backbone, lose their meaning in bfloat16's 8 bits of mantissa.
    pooled = keras.layers.GlobalAveragePooling2D(name=POOLED, dtype="float32")(inception.output)
    # Per-feature standardisation with a shrunk variance, fitted on the training images' features by
    # fit_feature_scaling (the identity until then). Pooled features of a randomly initialised InceptionV3 are
    # ~1e-4 in size, too small for the heads to learn from; pretrained features span very different scales and
    # include features that are constant on the training images. One shared layer handles both.
    features = keras.layers.Normalization(axis=-1, name=FEATURE_SCALING, dtype="float32")(pooled)
    return keras.Model(image, features, name="backbone")


def fit_feature_scaling(backbone: keras.Model, raw_features: np.ndarray, *, fit_rows=None) -> np.ndarray:
    """Fit the backbone's feature standardisation on ``raw_features[fit_rows]`` (default: all rows; the features
    must come from the unfitted backbone) and return every row of ``raw_features`` standardised.

    Each feature is centred on its training mean and divided by ``sqrt(var_j + VARIANCE_SHRINKAGE * mean(var))``:
    its own spread, shrunk toward the typical spread of all features. Why not plain z-scores: pretrained
    InceptionV3 features include ReLU channels that are exactly 0 on every training image (110 of 2,048 on real
    brain/lung images); dividing by their ~0 spread turned one validation image that activates such a channel
    into a z-score of 3.6e5 and wrecked the validation loss, and it amplifies rounding in int8 exports. With the
    shrinkage a dead feature is amplified at most ``1 / sqrt(VARIANCE_SHRINKAGE)`` (~3x) relative to a typical
    one. Why not one global scale: the floor is relative, so it works at any feature scale (random-init pooled
    features are ~1e-4, pretrained ones ~1e-1), and features keep most of their own standardisation.
    """
    scaling = backbone.get_layer(FEATURE_SCALING)
    if not (np.all(np.asarray(scaling.mean) == 0) and np.all(np.asarray(scaling.variance) == 1)):
        raise ModelError("the backbone's feature scaling is already fitted; fit it once, on raw features")
    fit = np.asarray(raw_features if fit_rows is None else raw_features[fit_rows], np.float64)
    variance = fit.var(axis=0)
    scaling.adapt_mean.assign(fit.mean(axis=0).astype(np.float32))
    scaling.adapt_variance.assign((variance + VARIANCE_SHRINKAGE * variance.mean()).astype(np.float32))
    scaling.finalize_state()
    return np.asarray(scaling(raw_features), np.float32)


def build_heads(tasks: tuple[str, ...] = TASKS) -> keras.Model:
    """Model from pooled features to a dict of logits, one entry per task, each the seed's top."""
    for task in tasks:
        if task not in NUM_CLASSES:
            raise ModelError(f"unknown task {task!r}; expected organ or cancer")
    features = keras.Input((FEATURE_DIM,), name="features")
    logits = {}
    for task in (t for t in TASKS if t in tasks):  # canonical order, whatever order was asked for
        x = keras.layers.Dense(HEAD_UNITS, activation="relu", name=f"{task}_hidden")(features)
        x = keras.layers.Dropout(HEAD_DROPOUT, name=f"{task}_dropout")(x)
        # float32 logits under mixed precision too: the losses, softmax and calibration need float32's range.
        logits[task] = keras.layers.Dense(NUM_CLASSES[task], name=task, dtype="float32")(x)
    return keras.Model(features, logits, name=HEADS)


def assemble(backbone: keras.Model, heads: keras.Model, *, name: str = "joint") -> keras.Model:
    """The end-to-end model ``image -> backbone -> heads`` (both parts shared, not copied; a dict of logits out)."""
    image = keras.Input(backbone.input_shape[1:], name="image")
    return keras.Model(image, heads(backbone(image)), name=name)


@dataclass(frozen=True)
class ModelParts:
    """The two sub-models of a model from :func:`assemble`, and the tasks its heads answer."""

    backbone: keras.Model
    heads: keras.Model
    tasks: tuple[str, ...]


def model_parts(model: keras.Model) -> ModelParts:
    """The backbone, heads and tasks of a built or loaded model; ModelError when it was not made by this module."""
    try:
        backbone, heads = model.get_layer(BACKBONE), model.get_layer(HEADS)
    except ValueError:
        raise ModelError(f"model {model.name!r} has no {BACKBONE!r} and {HEADS!r} sub-models; it was not built by "
                         "multitask.model (or by an older multitask): retrain it") from None
    return ModelParts(backbone=backbone, heads=heads, tasks=model_tasks(heads))


def model_tasks(model: keras.Model) -> tuple[str, ...]:
    """Tasks a model (or its heads) answers, in canonical order: the keys of the heads' output dict."""
    heads = model if model.name == HEADS else model_parts(model).heads
    outputs = heads.output if isinstance(heads.output, dict) else {}
    return tuple(t for t in TASKS if t in outputs)


def build_model(tasks: tuple[str, ...] = TASKS, image_size: int = 256,
                weights: str | os.PathLike | None = "imagenet") -> keras.Model:
    """Shared InceptionV3 backbone with one head per task: "joint" for both tasks, "single_<task>" for one."""
    name = "joint" if set(tasks) == set(TASKS) else f"single_{tasks[0]}"
    return assemble(build_backbone(image_size, weights), build_heads(tasks), name=name)


def build_joint_model(image_size: int = 256, weights: str | os.PathLike | None = "imagenet") -> keras.Model:
    """Shared InceptionV3 backbone with two heads; outputs ``{"organ": (None, 9), "cancer": (None, 2)}`` logits."""
    return build_model(TASKS, image_size, weights)


def build_single_task_model(
    task: str, image_size: int = 256, weights: str | os.PathLike | None = "imagenet"
) -> keras.Model:
    """The same backbone with one head (``task`` is "organ" or "cancer"); output is ``{task: logits}``."""
    return build_model((task,), image_size, weights)


def freeze_backbone(backbone: keras.Model, *, unfreeze_from: str | None = None) -> int:
    """Freeze the backbone, then unfreeze layers from ``unfreeze_from`` (a layer name) upward.

    BatchNormalization layers stay frozen, which in Keras also keeps them in inference mode, so fine-tuning
    on small batches does not wreck their statistics. Returns the number of trainable layers.
    """
    backbone.trainable = True  # reset nested flags before choosing
    names = [layer.name for layer in backbone.layers]
    if unfreeze_from is None:
        start = len(names)
    elif unfreeze_from in names:
        start = names.index(unfreeze_from)
    else:
        mixed = ", ".join(n for n in names if n.startswith("mixed"))
        raise ModelError(f"no layer named {unfreeze_from!r} in the backbone; choose one of: {mixed}")
    trainable = 0
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
        trainable += int(layer.trainable and bool(layer.weights))
    return trainable
