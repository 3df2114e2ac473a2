"""Measurement helpers for ``scripts/benchmark.py`` and the comparison notebook; nothing in the pipeline uses them."""

from __future__ import annotations

import time


def best_time(fn, *, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall seconds of ``fn()``, after one warm-up call that absorbs tracing."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def images_per_second(model, *, batch_size: int = 32, batches: int = 4, repeats: int = 3) -> float:
    """Inference throughput of ``model`` on random in-memory images: best of ``repeats`` timed passes.

    The forward pass is traced once (fixed input shape) and warmed up before timing, so the number measures the
    model, not graph building or file decoding.
    """
    import tensorflow as tf

    shape = (batch_size, *model.input_shape[1:])
    images = tf.random.uniform(shape, 0.0, 255.0, seed=0)
    forward = tf.function(lambda x: model(x, training=False), input_signature=[tf.TensorSpec(shape, tf.float32)])

    def one_pass():
        for _ in range(batches):
            outputs = forward(images)
        tf.nest.map_structure(lambda t: t.numpy(), outputs)  # wait for the last batch

    return batch_size * batches / best_time(one_pass, repeats=repeats)
