"""The inference graph that ``predict``, ``serve`` and every export run: one image in, calibrated answers out.

:func:`inference_model` builds, from a run's trained model, a functional Keras model with one input, ``image``
(float32 RGB in 0..255, NHWC, at the run's size; the single scaling to [-1, 1] stays inside), and named outputs:

* one per head (``organ``, ``cancer``): PROBABILITIES, ``softmax(logits / T)`` with the head's temperature;
* ``ood_score`` (when the run has an out-of-distribution detector): how unlike the training images the input is.

Everything is a built-in layer with fixed weights, so the graph saves under ``safe_mode=True`` and exports to ONNX
as one graph whose only input is the image. The backbone's feature standardisation (a ``Normalization`` layer
whose statistics are captured tensors, which tf2onnx would turn into extra runtime inputs) is rebuilt as a
constant ``BatchNormalization`` with epsilon 0: the same arithmetic, ``(x - mean) / sqrt(variance)``, held in
variables every exporter freezes. The backbone's and heads' own layers are shared, not copied.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import numpy as np

from multitask.model import FEATURE_SCALING, POOLED, model_parts

OOD_SCORE = "ood_score"


def constant_standardisation(layer: keras.layers.Normalization, *, name: str) -> keras.layers.BatchNormalization:
    """A BatchNormalization (inference mode, constant weights) that computes what the adapted ``layer`` does."""
    mean = np.asarray(layer.mean, np.float32).reshape(-1)
    # Normalization divides by max(sqrt(variance), epsilon): keep that floor so the two agree everywhere.
    variance = np.maximum(np.asarray(layer.variance, np.float32).reshape(-1), np.float32(keras.config.epsilon()) ** 2)
    frozen = keras.layers.BatchNormalization(axis=-1, epsilon=0.0, name=name)
    frozen.build((None, mean.size))
    frozen.set_weights([np.ones_like(mean), np.zeros_like(mean), mean, variance])
    frozen.trainable = False
    return frozen


def inference_model(model: keras.Model, *, temperatures: Mapping[str, float] | None = None,
                    ood=None) -> keras.Model:
    """The run's inference graph (see the module docstring); ``ood`` is a fitted detector
    (:class:`multitask.ood.OodDetector`) or None."""
    parts = model_parts(model)
    temperatures = {t: float((temperatures or {}).get(t, 1.0)) for t in parts.tasks}
    bad = {t: v for t, v in temperatures.items() if not v > 0}
    if bad:
        raise ValueError(f"temperatures must be positive, got {bad}")
    backbone = parts.backbone
    taps = {POOLED: backbone.get_layer(POOLED).output}
    if ood is not None:
        taps.update(ood.taps(backbone))
    trunk = keras.Model(backbone.input, taps, name="trunk")
    image = keras.Input(backbone.input_shape[1:], name="image")
    tapped = trunk(image)
    features = constant_standardisation(backbone.get_layer(FEATURE_SCALING), name="standardised")(tapped[POOLED])
    logits = parts.heads(features)
    outputs = {}
    for task in parts.tasks:
        scaled = keras.layers.Rescaling(1.0 / temperatures[task], name=f"{task}_temperature")(logits[task])
        outputs[task] = keras.layers.Softmax(axis=-1, name=f"{task}_probabilities")(scaled)
    if ood is not None:
        outputs[OOD_SCORE] = ood.graph_score({name: tapped[name] for name in ood.layers})
    inference = keras.Model(image, outputs, name=f"{model.name}_inference")
    inference(np.zeros((1, *inference.input_shape[1:]), np.float32))  # exporters refuse a model never called
    return inference


def output_names(inference: keras.Model) -> tuple[str, ...]:
    """The inference graph's output names: the heads in canonical order, then ``ood_score`` if present."""
    return tuple(inference.output)
