"""Grad-CAM for each head: where did the model look to decide the organ, and to decide malignancy?

Grad-CAM (Selvaraju et al., 2017) weights the channels of the last InceptionV3 mixed block ("mixed10") by
the spatial mean of the gradient of one head's logit for the predicted class, sums them, and keeps the
positive part. Heatmaps are returned at the **feature map's** resolution (e.g. 6x6 for 256 px inputs, 2x2 for
128 px), normalised per image to [0, 1]; :func:`upsample` brings them to the input resolution for display.

One forward pass and one gradient call per head and batch: per-sample gradients come out of a single
``tape.gradient`` of the summed scores, because samples do not interact at inference (BatchNorm uses its
moving statistics).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from multitask.taxonomy import TASKS

DEFAULT_LAYER = "mixed10"


class GradCam:
    """Grad-CAM for every head of a joint or single-task model from :mod:`multitask.model`."""

    def __init__(self, model, *, layer: str = DEFAULT_LAYER):
        import keras
        import tensorflow as tf

        from multitask.model import FEATURE_SCALING

        backbone = model.get_layer("backbone")
        self.tasks = tuple(t for t in TASKS if t in model.output_names)
        self.feature_maps = keras.Model(backbone.input, backbone.get_layer(layer).output)
        self.scaling = backbone.get_layer(FEATURE_SCALING)
        self.heads = {t: (model.get_layer(f"{t}_hidden"), model.get_layer(t)) for t in self.tasks}
        self._maps = tf.function(self._compute, reduce_retracing=True)

    def _compute(self, images):
        import tensorflow as tf

        with tf.GradientTape(persistent=True) as tape:
            maps = self.feature_maps(images, training=False)
            tape.watch(maps)
            pooled = self.scaling(tf.reduce_mean(maps, axis=(1, 2)))  # the backbone's pooling and scaling
            logits = {t: out(hidden(pooled)) for t, (hidden, out) in self.heads.items()}
            scores = {t: tf.reduce_max(v, axis=-1) for t, v in logits.items()}  # predicted class's logit
        cams, predicted = {}, {}
        for task in self.tasks:
            grads = tape.gradient(scores[task], maps)
            weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
            cam = tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1))
            peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
            cams[task] = tf.math.divide_no_nan(cam, peak)
            predicted[task] = tf.argmax(logits[task], axis=-1)
        del tape
        return cams, predicted

    def __call__(self, images) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Heatmaps {task: (N, h, w) in [0, 1]} and predicted class ids {task: (N,)} for a batch of images."""
        import tensorflow as tf

        cams, predicted = self._maps(tf.convert_to_tensor(images, tf.float32))
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

    from multitask.files import atomic_path

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
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=70, format="png")
    return Path(path)
