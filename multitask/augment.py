"""Training-time image augmentation for fine-tuning: the one module that imports keras-cv.

keras-cv is no longer maintained and reaches into private Keras APIs, so it stays behind
:func:`make_augmenter`; if it breaks, only this file changes. Every layer used here was checked with
keras 3.15 and keras-cv 0.9, eagerly and inside ``tf.data.Dataset.map``.

What is used, and why it is safe for these medical images (the label must not change):

* horizontal flips: histology, cytology and smears have no canonical orientation, and the organ or malignancy of
  an MRI/CT slice does not depend on left and right. Vertical flips are left out: an upside-down brain MRI is
  not an image the model will ever see.
* small rotations (at most about 10 degrees at the standard strength, mirrored borders instead of black corners,
  which would look like the dark background of an MRI or CT slice).
* mild brightness and contrast jitter (10% at the standard strength), the spread between scanners and staining
  batches.

How much is a setting, ``--augment`` (:data:`multitask.settings.AUGMENTS`), chosen on validation by
``scripts/sweep_defaults.py``; each strength keeps to the list above and only changes the amounts (:data:`AMOUNTS`):

* ``none``: no augmentation; fine-tuning sees the images as they are.
* ``standard`` (the default, and what every run before the setting used): rotation up to 0.03 of a turn
  (about 10.8 degrees), brightness and contrast jitter of 10%.
* ``strong``: rotation up to 0.05 of a turn (18 degrees) and 20% jitter. Still safe: a histology field or a smear
  has no orientation at all, and 18 degrees of an MRI/CT slice is a patient lying slightly askew; 20% brightness
  and contrast is within the spread of stain batches and scanner exposure, and never touches hue.

Left out on purpose: hue and saturation shifts (stain colour is diagnostic and tells organs apart, e.g. H&E
pink versus Papanicolaou blue), crops and zooms (a small lesion near the border could be cut away and turn a
malignant image into a benign-looking one), and MixUp/CutMix (labels of two organs would blend).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from multitask.errors import ConfigError
from multitask.settings import AUGMENTS

MAX_ROTATION = 0.03  # fraction of a full turn: 0.03 * 360 degrees = about 10.8 degrees
JITTER = 0.1


class Amounts(NamedTuple):
    """How far one strength goes: ``max_rotation`` as a fraction of a full turn, ``jitter`` of brightness and
    contrast as a fraction."""

    max_rotation: float
    jitter: float


AMOUNTS: dict[str, Amounts | None] = {  # one entry per settings.AUGMENTS; None: no augmentation
    "none": None,
    "standard": Amounts(MAX_ROTATION, JITTER),
    "strong": Amounts(0.05, 0.2),
}


def augment_amounts(strength: str) -> Amounts | None:
    """The rotation and jitter of ``strength`` (one of settings.AUGMENTS), None for "none"; else ConfigError."""
    if strength not in AUGMENTS or strength not in AMOUNTS:
        raise ConfigError(f"$augment must be one of {', '.join(AUGMENTS)}, got {strength!r}")
    return AMOUNTS[strength]


def augment_calls() -> int | None:
    """``num_parallel_calls`` for the tf.data map that applies the augmenter: one batch at a time (None) unless a GPU
    trains. keras-cv's layers draw from a seeded generator, and parallel calls take its draws in whatever order the
    threads run, so the same seed gave a different model: two identical fine-tuning runs (75 px, 2 epochs) ended
    1.4e-3 apart in their weights and at validation loss 1.40 against 1.22; one at a time, identical. On a CPU the
    training step is ~10x slower than augmenting a batch (3.85 s against 0.38 s for 32 images at 299 px on one
    thread), so prefetching keeps up without parallel calls; a GPU may need them, and is not bit-reproducible anyway
    (cuDNN). Whether a GPU trains is the Keras backend's answer (:func:`multitask.accelerate.gpu_capabilities`): under
    JAX, TensorFlow itself (tf.data's) may see no GPU."""
    import tensorflow as tf

    from multitask.accelerate import gpu_capabilities

    return tf.data.AUTOTUNE if gpu_capabilities() else None


def make_augmenter(seed: int | None = None, *, strength: str = "standard") -> Callable | None:
    """A ``batch -> batch`` callable for float32 RGB images in 0..255 (shape (n, h, w, 3)) at ``strength``; output
    stays in 0..255. None for strength "none" (nothing to apply, and keras-cv is not imported)."""
    amounts = augment_amounts(strength)
    if amounts is None:
        return None
    import keras_cv

    seed = 0 if seed is None else int(seed)
    pipeline = [
        keras_cv.layers.RandomFlip("horizontal", seed=seed),
        keras_cv.layers.RandomRotation(amounts.max_rotation, fill_mode="reflect", seed=seed + 1),
        keras_cv.layers.RandomBrightness(amounts.jitter, value_range=(0, 255), seed=seed + 2),
        keras_cv.layers.RandomContrast(value_range=(0, 255), factor=amounts.jitter, seed=seed + 3),
    ]

    def augment(images):
        for layer in pipeline:
            images = layer(images, training=True)
        return images

    return augment
