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

With ``--run RUN`` (a trained run; its weights matter here), two more:

5. Engines: images/s of the run's inference graph at batch 32 under Keras, ONNX Runtime fp32 and LiteRT int8
   (``multitask export``; exported first when missing), timed interleaved in one process, and each export's
   agreement with Keras on the run's test split. Targets: fp32 >= 1.15x with exact agreement; int8 >= 3x,
   argmax agreement >= 99% per head and max probability difference <= 0.05.
6. Predict overhead: ``Predictor.predict`` over the run's image files vs the bare model's images/s on the same
   images decoded in memory (batch 32, one trace per batch shape). Target: >= 0.95x.

    python scripts/benchmark.py --run RUN --only engines --only predict   # just those rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from multitask import data, model, synthetic  # noqa: E402
from multitask.benchmarking import best_time, images_per_second  # noqa: E402
from multitask.splits import load_split  # noqa: E402


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


def run_files(info, splits: tuple[str, ...] = ("test", "val", "train")) -> list[str]:
    """The run's image files of ``splits``, in that order."""
    manifest = load_split(info.split_path, taxonomy=info.taxonomy)
    return [str(p) for split in splits for p in manifest.loc[manifest["split"] == split, "path"]]


def bench_engines(run: str, batch_size: int, repeats: int) -> dict:
    """Images/s per engine on one batch (interleaved, best of ``repeats``); agreement with Keras on the test split."""
    from multitask.errors import ExportError
    from multitask.export import load_engine, load_images
    from multitask.predict import Predictor
    from multitask.rundir import open_run
    from multitask.taxonomy import MALIGNANT

    info = open_run(run)
    engines, checked = {}, {}
    for name in ("keras", "onnx", "int8"):
        try:
            engines[name], checked[name] = load_engine(info, name), True
        except ExportError as error:  # the self-check withheld it: time the unpublished artifact all the same
            print(f"{name}: {error}")
            engines[name], checked[name] = unchecked_engine(info, name), False
    images = load_images(run_files(info, ("test",)), info.image_size)
    batch = np.resize(images, (batch_size, *images.shape[1:]))  # the test images, repeated to fill a batch
    best = {name: float("inf") for name in engines}
    for round in range(repeats + 1):  # round 0 warms every engine up
        for name, engine in engines.items():
            start = time.perf_counter()
            engine(batch)
            if round:
                best[name] = min(best[name], time.perf_counter() - start)
    outputs = {name: Predictor(engine, labels=info.labels).predict_arrays(images, batch_size=batch_size)
               for name, engine in engines.items()}
    malignant = info.labels["cancer"].index(MALIGNANT)
    threshold = info.malignancy_threshold if info.malignancy_threshold is not None else 0.5
    result = {"run": run, "image_size": info.image_size, "batch_size": batch_size, "test_images": len(images)}
    for name in engines:
        ref, got = outputs["keras"], outputs[name]
        result[name] = {
            "images_per_s": batch_size / best[name],
            "x_keras": best["keras"] / best[name],
            "max_abs_diff": {t: float(np.max(np.abs(got[t] - ref[t]))) for t in info.tasks},
            "argmax_agreement": {t: float(np.mean(got[t].argmax(1) == ref[t].argmax(1))) for t in info.tasks},
            "passed_self_check": checked[name],
            "cancer_decision_agreement": float(np.mean((got["cancer"][:, malignant] >= threshold)
                                                       == (ref["cancer"][:, malignant] >= threshold))),
        }
    return result


def unchecked_engine(info, name: str):
    """The export ``name`` of a run written to a temporary folder without its self-check, for timing only."""
    from multitask import export

    folder = Path(tempfile.mkdtemp(prefix=f"benchmark-{name}-"))
    artifact = folder / export.ARTIFACTS[name]
    writer = {"onnx": export._write_onnx, "int8": export._write_int8}[name]
    writer(export.run_inference_model(info, ood=name not in export.WITHOUT_OOD), artifact)
    return export.open_engine(artifact, format=name)


def bench_predict_overhead(run: str, n_files: int, batch_size: int, repeats: int) -> dict:
    """Images/s of Predictor.predict over files vs the bare model on the same images already decoded in memory."""
    from multitask.export import load_images
    from multitask.predict import Predictor
    from multitask.rundir import open_run

    info = open_run(run)
    files = run_files(info)[:n_files]
    predictor = Predictor.from_run(info)
    bare = info.load_model()
    forward = tf.function(lambda x: bare(x, training=False))  # one trace per batch shape: the full and the last
    images = [tf.constant(load_images(files[i: i + batch_size], info.image_size))
              for i in range(0, len(files), batch_size)]

    def bare_pass():
        for batch in images:
            outputs = forward(batch)
        tf.nest.map_structure(lambda t: t.numpy(), outputs)

    bare_s, predict_s = float("inf"), float("inf")
    bare_pass()
    predictor.predict(files, batch_size=batch_size, progress=False)  # warm-up: traces, first dataset
    for _ in range(repeats):  # interleaved, so a busy moment of a shared machine hits both
        start = time.perf_counter()
        bare_pass()
        bare_s = min(bare_s, time.perf_counter() - start)
        start = time.perf_counter()
        predictor.predict(files, batch_size=batch_size, progress=False)
        predict_s = min(predict_s, time.perf_counter() - start)
    return {"run": run, "image_size": info.image_size, "files": len(files), "batch_size": batch_size,
            "bare_images_per_s": len(files) / bare_s, "predict_images_per_s": len(files) / predict_s,
            "ratio": bare_s / predict_s}


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


SECTIONS = ("dual", "heads", "pipeline", "engines", "predict")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not the machine")
    parser.add_argument("--run", help="a trained run: adds the engines and predict-overhead rows")
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--files", type=int, default=260, help="predict overhead: image files of the run to read")
    args = parser.parse_args()
    only = set(args.only or SECTIONS)
    size, batches = (96, 2) if args.quick else (256, 4)
    results = {"machine": {"platform": platform.platform(), "tensorflow": tf.__version__,
                           "keras": keras.__version__}}
    if "dual" in only:
        results["peak"] = cpu_peak()
        results["dual"] = bench_dual_prediction(size, 32, batches, repeats=2)
        dual, peak = results["dual"], results["peak"]
        achieved = dual["flops_per_image"] * dual["joint_images_per_s"]
        results["efficiency"] = {
            "achieved_flops_per_s": achieved,
            "fraction_of_theoretical_peak": achieved / peak["theoretical_flops_per_s"],
            "fraction_of_measured_matmul_peak": achieved / peak["measured_matmul_flops_per_s"],
        }
    if "heads" in only:
        results["heads"] = bench_cached_heads(size if args.quick else 128, 64 if args.quick else 256, 32)
    if "pipeline" in only:
        with tempfile.TemporaryDirectory() as tmp:
            results["pipeline"] = bench_pipeline(size, 32, 52 if args.quick else 520, Path(tmp))
        if "dual" in results:
            results["pipeline"]["ratio_to_joint_model"] = (
                results["pipeline"]["pipeline_images_per_s"] / results["dual"]["joint_images_per_s"])
    if args.run is None and only & {"engines", "predict"}:
        print("engines / predict: skipped, they need --run RUN (a trained run)")
    elif args.run is not None:
        repeats = 2 if args.quick else 5
        if "engines" in only:
            results["engines"] = bench_engines(args.run, 32, repeats)
        if "predict" in only:
            results["predict"] = bench_predict_overhead(args.run, args.files, 32, repeats)
    print(format_table(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.out}")


def format_table(r: dict) -> str:
    """The results as the markdown table pasted into the README (the sections that ran)."""
    rows = []
    if "dual" in r:
        d, e, peak = r["dual"], r["efficiency"], r["peak"]
        rows += [
            ("Dual prediction, joint model", f"{d['joint_images_per_s']:.1f} images/s", ""),
            ("Dual prediction, organ + cancer models", f"{d['separate_images_per_s']:.1f} images/s",
             f"ratio {d['ratio']:.2f} (target >= 1.9)"),
        ]
    if "heads" in r:
        h = r["heads"]
        speedup = f"speed-up {h['speedup']:.0f}x (target >= 20x)"
        rows.append(("Head epoch, recomputing the backbone", f"{h['recompute_backbone_s_per_epoch']:.2f} s", ""))
        rows.append(("Head epoch, cached features", f"{h['cached_features_s_per_epoch']:.3f} s", speedup))
    if "pipeline" in r:
        p = r["pipeline"]
        ratio = f"{p['ratio_to_joint_model']:.1f}x the joint model (target >= 3x)" if "ratio_to_joint_model" in p \
            else ""
        rows.append(("Input pipeline, 512 px JPEG -> decode + resize", f"{p['pipeline_images_per_s']:.0f} images/s",
                     ratio))
    if "dual" in r:
        rows += [
            ("FLOPs per image (joint, counted)", f"{d['flops_per_image'] / 1e9:.2f} GFLOP", ""),
            ("Achieved by the joint model", f"{e['achieved_flops_per_s'] / 1e9:.0f} GFLOP/s",
             "FLOPs/image x images/s"),
            ("Peak: 2048x2048 float32 matmul, measured", f"{peak['measured_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s",
             f"model reaches {e['fraction_of_measured_matmul_peak']:.0%} of it"),
            (f"Peak: {peak['cores']} cores x {peak['mhz'] / 1e3:.2f} GHz nominal x "
             f"{peak['fp32_flops_per_cycle_per_core']} FLOP/cycle",
             f"{peak['theoretical_flops_per_s'] / 1e9:.0f} GFLOP/s",
             f"model reaches {e['fraction_of_theoretical_peak']:.0%} (boost clocks exceed nominal)"),
            ("Joint model via Keras predict() / eager call", f"{d['joint_predict_call_images_per_s']:.1f} / "
             f"{d['joint_eager_call_images_per_s']:.1f} images/s", "per single batch, for comparison"),
        ]
    if "engines" in r:
        g = r["engines"]
        targets = {"keras": "", "onnx": "target >= 1.15x, exact agreement",
                   "int8": "target >= 3x, agreement >= 99%, max diff <= 0.05"}
        titles = {"keras": "Keras/TF", "onnx": "ONNX Runtime fp32", "int8": "LiteRT int8 (dynamic range)"}
        for name in ("keras", "onnx", "int8"):
            x = g[name]
            withheld = "" if x.get("passed_self_check", True) else "; fails its self-check, not published"
            agreement = "" if name == "keras" else (
                f"{withheld}; vs Keras on {g['test_images']} test images: argmax agreement "
                + " / ".join(f"{t} {a:.1%}" for t, a in x["argmax_agreement"].items())
                + ", max abs diff " + " / ".join(f"{t} {v:.2g}" for t, v in x["max_abs_diff"].items()))
            rows.append((f"Engine {titles[name]}, batch {g['batch_size']}, {g['image_size']} px",
                         f"{x['images_per_s']:.1f} images/s",
                         f"{x['x_keras']:.2f}x Keras{agreement}" + (f" ({targets[name]})" if targets[name] else "")))
    if "predict" in r:
        q = r["predict"]
        rows += [
            (f"Bare model on {q['files']} decoded images, {q['image_size']} px",
             f"{q['bare_images_per_s']:.1f} images/s", ""),
            (f"Predictor.predict on the same {q['files']} files", f"{q['predict_images_per_s']:.1f} images/s",
             f"{q['ratio']:.2f}x the bare model (target >= 0.95x)"),
        ]
    lines = ["| measurement | value | note |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
