"""Grad-CAM for each head: where did the model look to decide the organ, and to decide malignancy?

Grad-CAM (Selvaraju et al., 2017) weights the channels of an InceptionV3 mixed block by the spatial mean of the
gradient of one head's logit for its predicted class, sums them, and keeps the positive part. The block is the
last one, "mixed10", whenever its map is at least 3x3 (inputs of 160 px and more; 8x8 at 299 px); smaller inputs
shrink it to 1x1 or 2x2, which cannot show *where*, so the last block that is still 3x3 or larger is used instead
(e.g. "mixed7" at 75-128 px). :attr:`GradCam.layer` says which. Heatmaps are returned at that **feature map's**
resolution, normalised per image to [0, 1] (all zeros where nothing speaks for the predicted class);
:func:`upsample` brings them to the input resolution for display.

One forward pass and one gradient call per head and batch: per-sample gradients come out of a single
``tape.gradient`` of the summed scores, because samples do not interact at inference (BatchNorm uses its
moving statistics).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from multitask.files import save_figure
from multitask.model import model_parts

DEFAULT_LAYER = "mixed10"
MIN_MAP_SIZE = 3
FLAT_RANGE = 0.05  # a heatmap whose values span less than this is flat: it shows no place (all dark: nothing at all)
FLAT_NOTE = ("flat map: no region of the image raised the explained class's score, so the overlay shows no "
             "location (it is not a sign that the head looked nowhere in particular)")


def is_flat(heatmap) -> bool:
    """Whether a [0, 1] heatmap is flat (all dark when nothing spoke for the explained class: Grad-CAM's ReLU leaves
    zeros everywhere), and so says nothing about where the head looked."""
    values = np.asarray(heatmap, np.float64)
    return bool(values.size == 0 or np.ptp(values) < FLAT_RANGE)


def choose_layer(backbone) -> str:
    """"mixed10", or the last top-level mixed block whose feature map is at least MIN_MAP_SIZE wide."""
    blocks = [layer for layer in backbone.layers if layer.name.startswith("mixed") and "_" not in layer.name]
    wide_enough = [b.name for b in blocks if b.output.shape[1] >= MIN_MAP_SIZE]
    if DEFAULT_LAYER in wide_enough or not wide_enough:
        return DEFAULT_LAYER
    return wide_enough[-1]


class GradCam:
    """Grad-CAM for every head of a joint or single-task model from :mod:`multitask.model`."""

    def __init__(self, model, *, layer: str | None = None):
        import keras
        import tensorflow as tf

        parts = model_parts(model)
        self.layer = layer or choose_layer(parts.backbone)
        self.tasks, self.heads = parts.tasks, parts.heads
        # The block's maps and the backbone's own output (pooled, standardised features) from one forward pass.
        self.backbone = keras.Model(parts.backbone.input,
                                    [parts.backbone.get_layer(self.layer).output, parts.backbone.output])
        self._maps = tf.function(self._compute, reduce_retracing=True)

    def _compute(self, images, chosen):
        import tensorflow as tf

        with tf.GradientTape(persistent=True) as tape:
            maps, features = self.backbone(images, training=False)
            logits = self.heads(features, training=False)  # dropout off
            # The class to explain: the one the caller decided on (e.g. Malignant at the run's threshold, which
            # need not be the argmax), else the predicted one; its logit is what the gradients explain.
            classes = {t: tf.where(chosen[t] >= 0, chosen[t], tf.argmax(logits[t], axis=-1, output_type=tf.int32))
                       for t in self.tasks}
            scores = {t: tf.gather(logits[t], classes[t], batch_dims=1) for t in self.tasks}
        cams, predicted = {}, {}
        for task in self.tasks:
            grads = tape.gradient(scores[task], maps)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            cams[task] = tf.math.divide_no_nan(cam, peak)
            predicted[task] = classes[task]
        del tape
        return cams, predicted

    def __call__(self, images, classes: Mapping[str, Sequence[int]] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Heatmaps {task: (N, h, w) in [0, 1]} and the explained class ids {task: (N,)} for a batch of images.

        ``classes[task]`` names the class to explain per image (-1, or a task left out: the predicted class)."""
        import tensorflow as tf

        n = len(images)
        chosen = {t: tf.constant(np.asarray((classes or {}).get(t, np.full(n, -1)), np.int32).reshape(n))
                  for t in self.tasks}
        cams, predicted = self._maps(tf.convert_to_tensor(images, tf.float32), chosen)
        return {t: v.numpy() for t, v in cams.items()}, {t: v.numpy() for t, v in predicted.items()}


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    """A (h, w) heatmap resized bilinearly to (size, size), still in [0, 1]."""
    from PIL import Image

    image = Image.fromarray(np.asarray(heatmap, np.float32)).resize((size, size), Image.BILINEAR)
    return np.clip(np.asarray(image), 0.0, 1.0)


def save_overlay(
    image: np.ndarray, heatmaps: dict[str, np.ndarray], titles: dict[str, str], path: str | os.PathLike
) -> Path:
    """PNG of the input beside one overlay per head; ``titles`` label each head (e.g. "organ: Lung 0.93")."""
    return save_grid(np.asarray(image)[None], {task: np.asarray(cam)[None] for task, cam in heatmaps.items()},
                     [titles], path)


def save_grid(
    images: np.ndarray, heatmaps: dict[str, np.ndarray], titles: list[dict[str, str]], path: str | os.PathLike
) -> Path:
    """PNG with one row per image: the input, then each head's overlay; ``titles[i][task]`` labels the cells."""
    from matplotlib.figure import Figure  # no pyplot: no global backend switch, safe inside notebooks

    tasks = list(heatmaps)
    n = len(images)
    fig = Figure(figsize=(2.2 * (1 + len(tasks)), 2.3 * n))
    axes = fig.subplots(n, 1 + len(tasks), squeeze=False)
    for i, (row, image) in enumerate(zip(axes, images, strict=True)):
        pixels = np.clip(image, 0, 255).astype(np.uint8)
        row[0].imshow(pixels)
        row[0].set_title(titles[i].get("input", "input"), fontsize=7)
        for ax, task in zip(row[1:], tasks, strict=True):
            ax.imshow(pixels)
            ax.imshow(upsample(heatmaps[task][i], pixels.shape[0]), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_title(titles[i].get(task, task), fontsize=7)
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=70)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """The image (H, W, 3) 0..255 with ``heatmap`` upsampled over it in the jet colormap, as :func:`save_grid`
    draws it: uint8 RGB pixels, for callers that need the overlay in memory (the server's PNG data URLs)."""
    from matplotlib import colormaps

    pixels = np.clip(np.asarray(image, np.float32), 0, 255)
    colours = colormaps["jet"](upsample(heatmap, pixels.shape[0]))[..., :3] * 255.0
    return np.round((1 - alpha) * pixels + alpha * colours).astype(np.uint8)


def png_data_url(pixels: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URL of uint8 RGB pixels, encoded in memory (nothing touches the disk)."""
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
