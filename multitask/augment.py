"""Training-time image augmentation for fine-tuning: the one module that imports keras-cv.

keras-cv is no longer maintained and reaches into private Keras APIs, so it stays behind
:func:`make_augmenter`; if it breaks, only this file changes. Every layer used here was checked with
keras 3.15 and keras-cv 0.9, eagerly and inside ``tf.data.Dataset.map``.

What is used, and why it is safe for these medical images (the label must not change):

* horizontal flips: histology, cytology and smears have no canonical orientation, and the organ or malignancy of
  an MRI/CT slice does not depend on left and right. Vertical flips are left out: an upside-down brain MRI is
  not an image the model will ever see.
* small rotations (at most about 10 degrees, mirrored borders instead of black corners, which would look like
  the dark background of an MRI or CT slice).
* mild brightness and contrast jitter (10%), the spread between scanners and staining batches.

Left out on purpose: hue and saturation shifts (stain colour is diagnostic and tells organs apart, e.g. H&E
pink versus Papanicolaou blue), crops and zooms (a small lesion near the border could be cut away and turn a
malignant image into a benign-looking one), and MixUp/CutMix (labels of two organs would blend).
"""

from __future__ import annotations

from collections.abc import Callable

MAX_ROTATION = 0.03  # fraction of a full turn: 0.03 * 360 degrees = about 10.8 degrees
JITTER = 0.1


def make_augmenter(seed: int | None = None) -> Callable:
    """A ``batch -> batch`` callable for float32 RGB images in 0..255 (shape (n, h, w, 3)); output stays in 0..255."""
    import keras_cv

    seed = 0 if seed is None else int(seed)
    pipeline = [
        keras_cv.layers.RandomFlip("horizontal", seed=seed),
        keras_cv.layers.RandomRotation(MAX_ROTATION, fill_mode="reflect", seed=seed + 1),
        keras_cv.layers.RandomBrightness(JITTER, value_range=(0, 255), seed=seed + 2),
        keras_cv.layers.RandomContrast(value_range=(0, 255), factor=JITTER, seed=seed + 3),
    ]

    def augment(images):
        for layer in pipeline:
            images = layer(images, training=True)
        return images

    return augment
