"""Benchmark: one-pass dual prediction, cached-feature head training, input pipeline, and CPU efficiency.

Everything runs in one process, on the same machine and the same inputs, with random-initialised weights
(``weights=None``: speed does not depend on the weight values). It prints a table and writes JSON.

    python scripts/benchmark.py --out artifacts/benchmark.json            # the README's numbers
    python scripts/benchmark.py --quick                                    # a smoke run in ~1 minute

1. Dual prediction: images/s of the joint model vs the organ and cancer single-task models run back to back
   (batch 32, 256 px). Target: ratio >= 1.9.
2. Frozen-backbone head training: seconds per epoch of the heads on cached pooled features vs an epoch of the
   frozen full model on images (which recomputes the backbone). Target: >= 20x.
3. Input pipeline: images/s of decode + resize (``multitask.data.make_dataset``) from 512x512 JPEGs vs the
   joint model's images/s. Target: >= 3x.
4. Efficiency: FLOPs per image (counted layer by layer from the built model) x images/s over the CPU's peak.
   The peak is derived from the CPU (cores x clock x FP32 FLOPs per cycle) and also measured with a large
   float32 matmul, the best a real kernel reaches here; both ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from multitask import data, model, synthetic  # noqa: E402
from multitask.benchmarking import best_time, images_per_second  # noqa: E402


def bench_dual_prediction(image_size: int, batch_size: int, batches: int, repeats: int) -> dict:
    """Images/s: one joint pass vs the two single-task models back to back."""
    batch = tf.random.uniform((batch_size, image_size, image_size, 3), 0, 255, seed=0)
    joint = model.build_joint_model(image_size, weights=None)
    organ = model.build_single_task_model("organ", image_size, weights=None)
    cancer = model.build_single_task_model("cancer", image_size, weights=None)
    speed = {name: images_per_second(net, batch_size=batch_size, batches=batches, repeats=repeats)
             for name, net in (("joint", joint), ("organ", organ), ("cancer", cancer))}
    separate_ips = 1.0 / (1.0 / speed["organ"] + 1.0 / speed["cancer"])  # both models, one after the other
    # What the naive call paths cost, for the record: Keras predict() per batch and an eager __call__.
    predict_ips = batch_size / best_time(lambda: joint.predict(batch, verbose=0), repeats=repeats)
    eager_ips = batch_size / best_time(lambda: joint(batch, training=False), repeats=repeats)
    return {
        "image_size": image_size, "batch_size": batch_size, "images": batch_size * batches,
        "joint_images_per_s": speed["joint"], "separate_images_per_s": separate_ips,
        "organ_images_per_s": speed["organ"], "cancer_images_per_s": speed["cancer"],
        "ratio": speed["joint"] / separate_ips,
        "joint_predict_call_images_per_s": predict_ips, "joint_eager_call_images_per_s": eager_ips,
        "params": {"joint": joint.count_params(), "organ": organ.count_params(), "cancer": cancer.count_params()},
        "flops_per_image": count_flops(joint),
    }


def bench_cached_heads(image_size: int, n_images: int, batch_size: int) -> dict:
    """Seconds per epoch: heads on cached features vs the frozen full model on images."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (n_images, image_size, image_size, 3)).astype(np.float32)
    labels = {"organ": rng.integers(0, 9, n_images), "cancer": rng.integers(0, 2, n_images)}
    backbone = model.build_backbone(image_size, weights=None)
    heads = model.build_heads()
    full = model.assemble(backbone, heads)
    backbone.trainable = False
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for net in (full, heads):
        net.compile(optimizer="adam", loss={"organ": loss, "cancer": loss})
    features = backbone.predict(images, batch_size=batch_size, verbose=0)  # the one-off cache fill

    def epoch(net, x):
        return lambda: net.fit(x, labels, batch_size=batch_size, epochs=1, verbose=0, shuffle=True)

    full_s = best_time(epoch(full, images), repeats=2)
    heads_s = best_time(epoch(heads, features), repeats=3)
    return {"image_size": image_size, "images": n_images, "recompute_backbone_s_per_epoch": full_s,
            "cached_features_s_per_epoch": heads_s, "speedup": full_s / heads_s}


def bench_pipeline(image_size: int, batch_size: int, n_images: int, workdir: Path) -> dict:
    """Images/s of decode + resize from 512x512 JPEGs through the training input pipeline."""
    root = synthetic.generate(workdir / "jpegs", per_class=max(1, n_images // 26), size=512, seed=1)
    manifest = data.scan(root)
    ds = data.make_dataset(manifest, image_size=image_size, batch_size=batch_size)

    def epoch():
        for _ in ds:
            pass

    return {"source_px": 512, "image_size": image_size, "images": len(manifest),
            "pipeline_images_per_s": len(manifest) / best_time(epoch, repeats=2)}


def count_flops(net: keras.Model) -> int:
    """Multiply-adds x 2 of every Conv2D and Dense layer, from the built model's shapes (nested models too)."""
    total = 0
    for layer in net.layers:
        if isinstance(layer, keras.Model):
            total += count_flops(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            total += 2 * h * w * kh * kw * c_in * c_out // layer.groups
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * int(np.prod(layer.kernel.shape))
    return int(total)


def cpu_peak() -> dict:
    """Theoretical FP32 peak from the CPU description, and the measured best of a large matmul."""
    cores = os.cpu_count() or 1
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    mhz = max((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), default=0.0)
    name = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    # FP32 FLOPs per cycle per core: 2 FMA pipes x SIMD lanes x 2 (multiply + add). AMD Zen 4 runs AVX-512 on
    # 256-bit pipes, so its width is 8 lanes like AVX2; Intel server cores with avx512f have 16. /proc/cpuinfo
    # shows the nominal clock; cores that boost above it can exceed this figure, so the measured matmul is the
    # practical peak.
    lanes = 16 if "avx512f" in flags and "AMD" not in name else 8
    per_cycle = 2 * lanes * 2
    theoretical = cores * mhz * 1e6 * per_cycle
    a = tf.random.uniform((2048, 2048))
    matmul = tf.function(lambda: tf.linalg.matmul(a, a))
    seconds = best_time(lambda: matmul().numpy(), repeats=5)
    return {"cpu": name, "cores": cores, "mhz": mhz, "fp32_flops_per_cycle_per_core": per_cycle,
            "theoretical_flops_per_s": theoretical, "measured_matmul_flops_per_s": 2 * 2048**3 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    args = parser.parse_args()
    size, batches = (96, 2) if args.quick else (256, 4)
    results = {"machine": {"platform": platform.platform(), "tensorflow": tf.__version__,
                           "keras": keras.__version__}}
    results["peak"] = cpu_peak()
    results["dual"] = bench_dual_prediction(size, 32, batches, repeats=2)
    results["heads"] = bench_cached_heads(size if args.quick else 128, 64 if args.quick else 256, 32)
    with tempfile.TemporaryDirectory() as tmp:
        results["pipeline"] = bench_pipeline(size, 32, 52 if args.quick else 520, Path(tmp))
    dual, peak = results["dual"], results["peak"]
    achieved = dual["flops_per_image"] * dual["joint_images_per_s"]
    results["efficiency"] = {
        "achieved_flops_per_s": achieved,
        "fraction_of_theoretical_peak": achieved / peak["theoretical_flops_per_s"],
        "fraction_of_measured_matmul_peak": achieved / peak["measured_matmul_flops_per_s"],
    }
    results["pipeline"]["ratio_to_joint_model"] = (
        results["pipeline"]["pipeline_images_per_s"] / dual["joint_images_per_s"])
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def format_table(r: dict) -> str:
    """The results as the markdown table pasted into the README."""
    d, h, p, e, peak = r["dual"], r["heads"], r["pipeline"], r["efficiency"], r["peak"]
    rows = [
        ("Dual prediction, joint model", f"{d['joint_images_per_s']:.1f} images/s", ""),
        ("Dual prediction, organ + cancer models", f"{d['separate_images_per_s']:.1f} images/s",
         f"ratio {d['ratio']:.2f} (target >= 1.9)"),
        ("Head epoch, recomputing the backbone", f"{h['recompute_backbone_s_per_epoch']:.2f} s", ""),
        ("Head epoch, cached features", f"{h['cached_features_s_per_epoch']:.3f} s",
         f"speed-up {h['speedup']:.0f}x (target >= 20x)"),
        ("Input pipeline, 512 px JPEG -> decode + resize", f"{p['pipeline_images_per_s']:.0f} images/s",
         f"{p['ratio_to_joint_model']:.1f}x the joint model (target >= 3x)"),
        ("FLOPs per image (joint, counted)", f"{d['flops_per_image'] / 1e9:.2f} GFLOP", ""),
        ("Achieved by the joint model", f"{e['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s", "FLOPs/image x images/s"),
        ("Peak: 2048x2048 float32 matmul, measured", f"{peak['measured_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
         f"model reaches {e['fraction_of_measured_matmul_peak']:.0%} of it"),
        (f"Peak: {peak['cores']} cores x {peak['mhz'] / 1e3:.2f} GHz nominal x "
         f"{peak['fp32_flops_per_cycle_per_core']} FLOP/cycle", f"{peak['theoretical_flops_per_s'] / 1e9:.0f} GFLOP/s",
         f"model reaches {e['fraction_of_theoretical_peak']:.0%} (boost clocks exceed nominal)"),
        ("Joint model via Keras predict() / eager call", f"{d['joint_predict_call_images_per_s']:.1f} / "
         f"{d['joint_eager_call_images_per_s']:.1f} images/s", "per single batch, for comparison"),
    ]
    lines = ["| measurement | value | note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
