"""Inference engines: one small interface over Keras, ONNX Runtime (fp32), LiteRT (int8) and TF SavedModel.

An engine takes a batch of images, float32 RGB in 0..255, NHWC at its ``image_size``, and returns a dict of numpy
arrays, one per output of the inference graph (:mod:`multitask.inference`): probabilities per head, and
``ood_score`` when the run has a detector. Every engine answers with the same keys, so callers (``Predictor``, the
exporter's self-check, the server) never care which runtime runs underneath. :func:`multitask.export.load_engine`
builds one from a run.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from multitask.errors import ConfigError
from multitask.settings import ENGINES  # noqa: F401  (the names the engines answer to)
from multitask.taxonomy import TASKS


class Engine:
    """Images (N, S, S, 3) float32 0..255 in, ``{output name: numpy array}`` out."""

    name: str = "engine"
    image_size: int = 0
    output_names: tuple[str, ...] = ()

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(t for t in TASKS if t in self.output_names)

    def __call__(self, images) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _check(self, images) -> None:
        shape = tuple(images.shape)
        if len(shape) != 4 or shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"the {self.name} engine expects images of shape (N, {self.image_size}, "
                             f"{self.image_size}, 3), got {shape}")


class FlipAveraged(Engine):
    """Flip test-time augmentation around any engine: each image's class probabilities are the mean of the
    image's and its horizontal mirror's; ``ood_score`` is the original image's alone.

    One call of the wrapped engine on a batch of 2n (the n images, then their n mirrors) rather than two calls of
    n: the same arithmetic in one dispatch. On 2 cores the two cost the same (scripts/tta_timing.py, 160 px: 42.2
    against 40.8 ms per image, within the noise); with more cores or a GPU, the larger batch is the one that keeps
    them busy. The price is twice a batch's activations in memory, a few hundred MB at batch 32 and 256 px.

    A horizontal flip is the one view the model was trained to treat as the same image (multitask.augment), so it
    asks the same question twice. The OOD score stays the original's because its threshold is a percentile of
    un-flipped validation images' scores: a mean over two views is a different statistic, and the flags would then
    not mean what the threshold promises.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.name = f"{engine.name}+flip"
        self.image_size = engine.image_size
        self.output_names = engine.output_names

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.asarray(images, np.float32)
        self._check(images)
        n = len(images)
        both = self.engine(np.concatenate([images, images[:, :, ::-1, :]]))
        return {name: (value[:n] + value[n:]) / 2 if name in TASKS else value[:n] for name, value in both.items()}


class KerasEngine(Engine):
    """The inference graph in one traced ``tf.function``; the reference every export is checked against."""

    name = "keras"

    def __init__(self, inference):
        import tensorflow as tf

        self.model = inference
        self.output_names = tuple(inference.output)
        self.image_size = int(inference.input_shape[1])
        # One trace for every batch size (the last batch is smaller): the batch dimension is left open.
        spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.float32)
        self.forward = tf.function(lambda images: inference(images, training=False), input_signature=[spec])

    def __call__(self, images) -> dict[str, np.ndarray]:
        self._check(images)
        return {name: np.asarray(value) for name, value in self.forward(images).items()}


class OnnxEngine(Engine):
    """An exported ONNX file run by ONNX Runtime on the CPU."""

    def __init__(self, path: str | os.PathLike, *, name: str = "onnx", threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # One inference at a time uses every core (a server that runs other work beside it may want fewer).
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.name, self.path = name, Path(path)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        (image,) = self.session.get_inputs()  # the export keeps one input; a second would be a broken export
        self.input_name = image.name
        self.image_size = int(image.shape[1])
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.asarray(images, np.float32)
        self._check(images)
        values = self.session.run(list(self.output_names), {self.input_name: images})
        return dict(zip(self.output_names, values, strict=True))


class LiteRtEngine(Engine):
    """An exported LiteRT (TensorFlow Lite) file, called through its ``serving_default`` signature on the CPU.

    The interpreter comes from ``ai-edge-litert`` (TensorFlow's own ``tf.lite.Interpreter`` is deprecated); its
    XNNPACK delegate runs the int8 kernels. Not thread-safe: one engine per thread, as the server and
    ``Predictor`` use it.

    ``kernels`` (default: the ``MULTITASK_LITERT_KERNELS`` environment variable, else ``xnnpack``) picks the op
    resolver: ``xnnpack`` (LiteRT's default: XNNPACK delegate, whose int8 kernels differ between CPU instruction
    sets), ``builtin`` (LiteRT's optimised kernels, no delegate) or ``reference`` (LiteRT's plain reference
    kernels: slow, the same on every CPU). The numerics tests run under each to show the spread.
    """

    def __init__(self, path: str | os.PathLike, *, name: str = "int8", threads: int | None = None,
                 kernels: str | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise ConfigError("the int8 engine needs LiteRT (ai-edge-litert is missing): "
                              "pip install 'multitask[export]'") from None

        kernels = kernels or os.environ.get("MULTITASK_LITERT_KERNELS") or "xnnpack"
        resolvers = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                     "reference": OpResolverType.BUILTIN_REF}
        if kernels not in resolvers:
            raise ConfigError(f"MULTITASK_LITERT_KERNELS must be one of {', '.join(resolvers)}, got {kernels!r}")
        self.name, self.path, self.kernels = name, Path(path), kernels
        interpreter = Interpreter(model_path=str(path), num_threads=threads or os.cpu_count() or 1,
                                  experimental_op_resolver_type=resolvers[kernels])
        self.runner = interpreter.get_signature_runner("serving_default")
        (detail,) = self.runner.get_input_details().values()
        self.image_size = int(detail["shape_signature"][1])
        self.output_names = tuple(sorted(self.runner.get_output_details(), key=_output_order))

    def __call__(self, images) -> dict[str, np.ndarray]:
        images = np.ascontiguousarray(images, np.float32)
        self._check(images)
        outputs = self.runner(image=images)  # resizes the batch dimension when it changes
        return {name: np.array(outputs[name]) for name in self.output_names}


def _output_order(name: str) -> tuple[int, str]:
    """Heads in canonical order, then anything else (ood_score) by name: signatures list outputs alphabetically."""
    return (TASKS.index(name), name) if name in TASKS else (len(TASKS), name)


class SavedModelEngine(Engine):
    """An exported TF SavedModel, called through its ``serving_default`` signature (as TF Serving does)."""

    name = "tf_saved_model"

    def __init__(self, path: str | os.PathLike):
        import tensorflow as tf

        self.path = Path(path)
        self.signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        spec = next(iter(self.signature.structured_input_signature[1].values()))
        self.image_size = int(spec.shape[1])
        self.output_names = tuple(self.signature.structured_outputs)

    def __call__(self, images) -> dict[str, np.ndarray]:
        import tensorflow as tf

        self._check(images)
        outputs = self.signature(tf.convert_to_tensor(images, tf.float32))
        return {name: value.numpy() for name, value in outputs.items()}
