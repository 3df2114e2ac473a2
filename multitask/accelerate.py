"""Precision and XLA: what ``--precision`` and ``--jit-compile`` resolve to on this machine, and a float32 copy of a
model trained in mixed precision. Backend-neutral (Keras 3 on TensorFlow, JAX or PyTorch).

Mixed precision computes convolutions and matrix products in 16 bits and keeps every variable in float32. The
layers that must stay exact keep float32 whatever the policy (:mod:`multitask.model`): the pooled features and
their standardisation, and each head's logits, so the losses, calibration and the feature cache see float32.
float16 needs its loss scaled against underflow (:func:`make_optimizer` wraps the optimizer); bfloat16 has
float32's range and does not.

A model trained in mixed precision is saved as a float32 copy (:func:`float32_copy`): the same weights, in a graph
whose every layer computes in float32, so ``model.keras`` loads and predicts in float32 anywhere (a CPU without
bfloat16 arithmetic, ONNX and int8 export) and under ``safe_mode=True``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import keras

from multitask.errors import ConfigError

log = logging.getLogger(__name__)

FLOAT32 = "float32"
SIXTEEN_BITS = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}  # policy -> the type it computes in
BFLOAT16_MIN_CAPABILITY = (8, 0)  # NVIDIA Ampere and later compute in bfloat16 at full rate


def gpu_capabilities() -> list[tuple[int, int]]:
    """The compute capability of every GPU the Keras backend sees (empty on a CPU-only machine)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return [tuple(tf.config.experimental.get_device_details(g).get("compute_capability") or (0, 0)) for g in gpus]
    if backend == "jax":
        import jax

        return [_capability(getattr(d, "compute_capability", "0.0")) for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return []


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = str(text).partition(".")
    return (int(major or 0), int(minor or 0))


def resolve_precision(choice: str, *, gpus: list[tuple[int, int]] | None = None) -> str:
    """The Keras dtype policy that ``--precision choice`` means here: ``auto`` is mixed_bfloat16 when every GPU
    computes bfloat16 at full rate, else float32 (CPUs, older GPUs)."""
    if choice != "auto":
        return choice
    gpus = gpu_capabilities() if gpus is None else gpus
    return "mixed_bfloat16" if gpus and all(c >= BFLOAT16_MIN_CAPABILITY for c in gpus) else FLOAT32


def check_precision(policy: str) -> None:
    """ConfigError unless this machine computes convolutions in ``policy``'s 16-bit type (nothing to check for
    float32). Probed with one tiny convolution rather than judged from the CPU's name: TensorFlow's oneDNN kernels
    need AVX-512 (bfloat16: AVX512_BF16 or AMX for speed) and fail on an AVX2-only CPU, or under
    ``ONEDNN_MAX_CPU_ISA=AVX2``, with an AbortedError deep inside the first training step."""
    dtype = SIXTEEN_BITS.get(policy)
    if dtype is None:
        return
    try:
        images = keras.ops.ones((1, 4, 4, 2), dtype=dtype)
        keras.ops.convert_to_numpy(keras.ops.conv(images, keras.ops.ones((3, 3, 2, 2), dtype=dtype), padding="same"))
    except Exception as exc:  # noqa: BLE001 - whichever backend and kernel refused, the answer is the same
        text = " ".join(str(exc).split())
        reason = text.partition("message:")[2].split(".")[0].strip() or text[:120]  # oneDNN's own words, if any
        raise ConfigError(f"$precision {policy}: this machine cannot compute {dtype} convolutions "
                          f"({type(exc).__name__}: {reason}); use --precision float32, or auto, which picks "
                          "float32 on CPUs") from None


def resolve_jit(choice: str, *, gpus: list[tuple[int, int]] | None = None, distributed: bool = False) -> bool:
    """Whether ``--jit-compile choice`` compiles the training step with XLA: ``auto`` is on where a GPU is present
    (and no tf.distribute strategy spreads the step, which Keras does not compile), off on CPUs."""
    if choice != "auto":
        return choice == "on"
    gpus = gpu_capabilities() if gpus is None else gpus
    return bool(gpus) and not distributed


@contextlib.contextmanager
def dtype_policy(name: str) -> Iterator[None]:
    """Build layers under the global dtype policy ``name``; the previous policy comes back on exit."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def make_optimizer(learning_rate: float, *, precision: str, decay_steps: int | None = None
                   ) -> keras.optimizers.Optimizer:
    """Adam at ``learning_rate``, cosine-decayed to 0 over ``decay_steps`` optimizer steps when given (the schedule
    reads the optimizer's step count, which its saved state holds); under mixed_float16 wrapped in a
    LossScaleOptimizer (dynamic loss scaling)."""
    if decay_steps:
        learning_rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=decay_steps)
    optimizer = keras.optimizers.Adam(learning_rate)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def float32_copy(model: keras.Model, build: Callable[[], keras.Model]) -> keras.Model:
    """``model``'s weights in a fresh float32 graph made by ``build()`` (the builder that made ``model``, called here
    under the float32 policy); ``model`` itself when it already computes in float32 throughout."""
    if all(layer.dtype_policy.name == FLOAT32 for layer in _all_layers(model)):
        return model
    with dtype_policy(FLOAT32):
        copy = build()
    copy.set_weights([keras.ops.convert_to_numpy(w) for w in model.weights])
    for layer in _all_layers(copy):
        if isinstance(layer, keras.layers.Normalization):  # its mean and variance are derived from the weights
            layer.finalize_state()
    return copy


def _all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
