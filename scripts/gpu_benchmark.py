"""GPU benchmark: the project's fine-tuning and feature extraction on one GPU, under Keras on JAX, against the
torchvision peer. One prepared script, about 7 minutes on an H200; it writes JSON as it goes.

Keras 3 runs the project's own backend-neutral code here (``multitask.model``, ``multitask.weighting``,
``multitask.decoded``, ``multitask.accelerate``), so it needs no TensorFlow: ``KERAS_BACKEND=jax`` is set before
Keras is imported. Random weights throughout (speed does not depend on their values), 256 px.

    KERAS_BACKEND=jax python scripts/gpu_benchmark.py --out gpu_benchmark.json          # the README's numbers
    KERAS_BACKEND=jax python scripts/gpu_benchmark.py --smoke --out /tmp/smoke.json     # minutes on a CPU, 75 px

On a machine with JAX (CUDA) but no Keras (the lent H200: JAX 0.11.2, PyTorch 2.11, torchvision, Python 3.12), carry
the wheels of keras 3.15.1, optree and namex (2.9 MB), downloaded beside the checkout into the git-ignored ``.whl``:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl keras==3.15.1 optree namex

and run there, in one call (carry ``.whl``; the JSON is rewritten after each section, so a timeout loses only the
section that was running; the peer runs last):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
    export PYTHONPATH=/tmp/site && KERAS_BACKEND=jax PYTHONUNBUFFERED=1 \
    timeout 570 python3 scripts/gpu_benchmark.py --out $OUT/gpu_benchmark.json

Sections (``--only NAME``, repeatable; all by default):

1. ``matmul``: an 8192^3 bfloat16 matrix product, the chip's practical ceiling.
2. ``loader``: a decoded-image cache on the host's disk (``multitask.decoded``: a uint8 .npy of N images, memory-
   mapped) read in shuffled batches by ``read_batches`` with 1..16 threads: images/s, the host's side alone.
   The file's pages are dropped from the page cache first where the kernel allows it (``cold`` says whether it did).
3. ``features``: feature extraction end to end: shuffled uint8 batches from the cache on disk -> the backbone
   (pixels cast to float inside the jitted graph) -> pooled features back on the host; float32 and mixed_bfloat16,
   batch 256/512/1024; and the same backbone on uint8 batches already on the GPU (the compute ceiling).
   Goal: >= 20,000 images/s end to end.
4. ``fine_tune``: the project's fine-tuning step: the joint model unfrozen from mixed7 with BatchNorm frozen
   (``freeze_backbone``), both heads, static loss weights 1/1, ``MultiTaskTrainer`` with Adam, XLA; float32 vs
   mixed_bfloat16 at batch 128 and 256; on batches already on the GPU, and end to end from the cache on disk.
   Goal: >= 5,000 images/s.
5. ``peer``: torchvision's InceptionV3 with the same two heads, eager, channels_last, bfloat16 autocast: the same
   fine-tuning (from Mixed_6e, BatchNorm frozen), the whole network, and inference, at batch 128 and 256.

Each figure is images per second over ``--steps`` timed steps after warm-up steps that compile; one section that
fails is recorded with its error and the others still run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU in the peer section
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's multitask, installed or not

import numpy as np  # noqa: E402

SECTIONS = ("matmul", "loader", "features", "fine_tune", "peer")
PRECISIONS = ("float32", "mixed_bfloat16")
# keras mixed0..mixed10 are torchvision's Mixed_5b..Mixed_7c: the project's --unfreeze-from mixed7 is Mixed_6e.
PEER_UNFREEZE_FROM = "Mixed_6e"


# ----------------------------------------------------------------------------------------------- helpers


def rate(images: int, seconds: float) -> float:
    return round(images / seconds, 1) if seconds > 0 else float("nan")


def sync(value):
    """Wait for the device's work behind ``value`` (JAX dispatches asynchronously)."""
    import jax

    return jax.block_until_ready(value)


def make_cache(folder: Path, *, count: int, image_size: int, seed: int = 0) -> Path:
    """A decoded-image cache file as ``multitask.decoded`` writes it (uint8 .npy), of noise images."""
    path = folder / f"decoded-{image_size}px-benchmark.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, image_size, image_size, 3))
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size=(min(count, 512), image_size, image_size, 3), dtype=np.uint8)
    for start in range(0, count, len(block)):
        stop = min(count, start + len(block))
        images[start:stop] = block[: stop - start] ^ np.uint8(start // len(block) % 251)
    images.flush()
    del images
    return path


def drop_page_cache(path: Path) -> bool:
    """Ask the kernel to forget ``path``'s pages, so the next read comes from the disk; whether it could."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (OSError, AttributeError):
        return False


def uint8_batches(images: np.ndarray, *, batch_size: int, steps: int, seed: int, workers: int):
    """``steps`` shuffled batches of ``images`` read by ``multitask.decoded.read_batches``."""
    from multitask.decoded import read_batches

    order = np.random.default_rng(seed).permutation(len(images))
    needed = batch_size * steps
    positions = np.resize(order, needed)  # wraps around when steps x batch exceeds the file
    for _, batch in read_batches(images, positions, batch_size=batch_size, workers=workers, ahead=2 * workers):
        yield batch


# ----------------------------------------------------------------------------------------------- sections


def bench_matmul(args) -> dict:
    import jax
    import jax.numpy as jnp

    n = 1024 if args.smoke else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    product = jax.jit(lambda x: x @ x)
    sync(product(a))
    repeats = 3 if args.smoke else 20
    start = time.perf_counter()
    for _ in range(repeats):
        out = product(a)
    sync(out)
    seconds = (time.perf_counter() - start) / repeats
    return {"n": n, "tflops_bf16": round(2 * n**3 / seconds / 1e12, 3)}


def bench_loader(args, cache: Path) -> dict:
    images = np.load(cache, mmap_mode="r")
    out = {"images": len(images), "bytes": int(images.nbytes), "batch_size": args.loader_batch, "threads": {}}
    for workers in args.threads:
        cold = drop_page_cache(cache)
        images = np.load(cache, mmap_mode="r")
        steps = max(1, len(images) // args.loader_batch)
        start = time.perf_counter()
        count = sum(len(b) for b in uint8_batches(images, batch_size=args.loader_batch, steps=steps, seed=workers,
                                                  workers=workers))
        seconds = time.perf_counter() - start
        out["threads"][str(workers)] = {"images_per_s": rate(count, seconds), "gb_per_s": round(
            count * images[0].nbytes / seconds / 1e9, 2), "cold": cold}
        print(f"  loader, {workers} threads: {out['threads'][str(workers)]}", flush=True)
    return out


def backbone_forward(precision: str, image_size: int):
    """A jitted ``uint8 images -> pooled features`` of the project's backbone built under ``precision``."""
    import jax

    from multitask.accelerate import dtype_policy
    from multitask.model import build_backbone

    with dtype_policy(precision):
        backbone = build_backbone(image_size, weights=None)
    trainable = [v.value for v in backbone.trainable_variables]
    fixed = [v.value for v in backbone.non_trainable_variables]

    @jax.jit
    def forward(images):
        features, _ = backbone.stateless_call(trainable, fixed, images, training=False)
        return features

    return forward


def bench_features(args, cache: Path) -> dict:
    import jax

    out = {}
    images = np.load(cache, mmap_mode="r")
    for precision in PRECISIONS:
        forward = backbone_forward(precision, args.image_size)
        for batch in args.feature_batches:
            name = f"{precision}_batch{batch}"
            sync(forward(np.zeros((batch, args.image_size, args.image_size, 3), np.uint8)))  # compile
            on_device = jax.device_put(np.asarray(images[:batch]))
            sync(forward(on_device))
            start = time.perf_counter()
            for _ in range(args.steps):
                result = forward(on_device)
            sync(result)
            device_rate = rate(batch * args.steps, time.perf_counter() - start)
            steps = max(args.steps, len(images) // batch)
            cold = drop_page_cache(cache)
            start, pooled = time.perf_counter(), []
            for uint8 in uint8_batches(images, batch_size=batch, steps=steps, seed=batch, workers=args.workers):
                pooled.append(forward(uint8))
                if len(pooled) > 4:  # results come back to the host as they finish, a few batches behind
                    np.asarray(pooled[-5])
            host = [np.asarray(p) for p in pooled]
            end_to_end = rate(sum(len(h) for h in host), time.perf_counter() - start)
            out[name] = {"end_to_end_images_per_s": end_to_end, "on_device_images_per_s": device_rate,
                         "images": batch * steps, "cold": cold, "feature_dtype": str(host[0].dtype)}
            print(f"  features {name}: {out[name]}", flush=True)
    return out


def fine_tune_trainer(precision: str, image_size: int):
    """The project's fine-tuning setup: joint model, unfrozen from mixed7, BatchNorm frozen, static 1/1 weights."""
    from multitask.accelerate import dtype_policy, make_optimizer
    from multitask.model import build_model, freeze_backbone, model_parts
    from multitask.weighting import MultiTaskTrainer, make_weighting

    with dtype_policy(precision):
        model = build_model(image_size=image_size, weights=None)
    parts = model_parts(model)
    trainable = freeze_backbone(parts.backbone, unfreeze_from="mixed7")
    weighting = make_weighting("static", tasks=parts.tasks, loss_weights={"organ": 1.0, "cancer": 1.0})
    trainer = MultiTaskTrainer(model, weighting)
    trainer.compile(optimizer=make_optimizer(1e-5, precision=precision), jit_compile=True)
    return trainer, trainable


def bench_fine_tune(args, cache: Path) -> dict:
    import jax

    out = {}
    images = np.load(cache, mmap_mode="r")
    rng = np.random.default_rng(0)
    for precision in PRECISIONS:
        for batch in args.train_batches:
            name = f"{precision}_batch{batch}"
            trainer, trainable = fine_tune_trainer(precision, args.image_size)
            labels = {"organ": rng.integers(0, 9, batch).astype(np.int32),
                      "cancer": rng.integers(0, 2, batch).astype(np.int32)}
            on_device = jax.device_put(np.asarray(images[:batch]))
            device_labels = jax.device_put(labels)
            start = time.perf_counter()
            for _ in range(args.warmup):
                logs = trainer.train_on_batch(on_device, device_labels, return_dict=True)
            compile_s = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.steps):
                logs = trainer.train_on_batch(on_device, device_labels, return_dict=True)
            device_rate = rate(batch * args.steps, time.perf_counter() - start)
            start = time.perf_counter()
            for uint8 in uint8_batches(images, batch_size=batch, steps=args.steps, seed=batch, workers=args.workers):
                logs = trainer.train_on_batch(uint8, labels, return_dict=True)
            end_to_end = rate(batch * args.steps, time.perf_counter() - start)
            out[name] = {"on_device_images_per_s": device_rate, "end_to_end_images_per_s": end_to_end,
                         "trainable_layers": trainable, "warmup_s": round(compile_s, 1),
                         "loss": round(float(logs["loss"]), 4)}
            print(f"  fine_tune {name}: {out[name]}", flush=True)
            del trainer
    return out


def peer_model(image_size: int):
    """torchvision InceptionV3 (no aux head) ending at pooled features, with the project's two heads."""
    import torch
    from torch import nn
    from torchvision.models import inception_v3

    class Peer(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = inception_v3(weights=None, aux_logits=False, init_weights=False)
            self.backbone.fc = nn.Identity()
            self.heads = nn.ModuleDict({task: nn.Sequential(nn.Linear(2048, 256), nn.ReLU(), nn.Dropout(0.2),
                                                            nn.Linear(256, classes))
                                        for task, classes in (("organ", 9), ("cancer", 2))})

        def forward(self, uint8):  # raw 0..255 pixels, NHWC uint8 -> [-1, 1] float, as the Keras model does
            images = uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous(memory_format=torch.channels_last)
            features = self.backbone(images)
            return {task: head(features) for task, head in self.heads.items()}

    return Peer()


def peer_freeze(peer, *, unfreeze_from: str | None) -> None:
    """The project's fine-tuning in torch terms: blocks before ``unfreeze_from`` frozen, BatchNorm frozen and in
    eval mode everywhere; ``None`` trains the whole network (BatchNorm too)."""
    from torch import nn

    names = [name for name, _ in peer.backbone.named_children()]
    start = names.index(unfreeze_from) if unfreeze_from else 0
    for i, (_, block) in enumerate(peer.backbone.named_children()):
        for parameter in block.parameters():
            parameter.requires_grad = i >= start
    if unfreeze_from:
        for module in peer.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()
                for parameter in module.parameters():
                    parameter.requires_grad = False


def bench_peer(args, cache: Path) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"device": device, "torch": torch.__version__}
    images = np.load(cache, mmap_mode="r")
    for batch in args.train_batches:
        uint8 = torch.from_numpy(np.array(images[:batch])).to(device)
        labels = {"organ": torch.randint(0, 9, (batch,), device=device),
                  "cancer": torch.randint(0, 2, (batch,), device=device)}
        for mode, unfreeze_from in (("fine_tune_mixed7", PEER_UNFREEZE_FROM), ("whole_network", None)):
            peer = peer_model(args.image_size).to(device).to(memory_format=torch.channels_last).train()
            peer_freeze(peer, unfreeze_from=unfreeze_from)
            name = f"{mode}_bf16_batch{batch}"
            out[name] = peer_train_rate(peer, uint8, labels, device=device, warmup=args.warmup, steps=args.steps)
            print(f"  peer {name}: {out[name]}", flush=True)
        name = f"inference_bf16_batch{batch}"
        out[name] = peer_inference_rate(peer.eval(), uint8, device=device, warmup=args.warmup, steps=args.steps)
        print(f"  peer {name}: {out[name]}", flush=True)
    return out


def peer_train_rate(peer, uint8, labels, *, device: str, warmup: int, steps: int) -> dict:
    """Images/s of Adam steps on the summed cross-entropy of both heads, under bfloat16 autocast."""
    import torch
    import torch.nn.functional as F

    optimizer = torch.optim.Adam([p for p in peer.parameters() if p.requires_grad], lr=1e-5)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = peer(uint8)
            loss = sum(F.cross_entropy(logits[t].float(), labels[t]) for t in labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(warmup):
        step()
    _torch_sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _torch_sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": rate(len(uint8) * steps, seconds), "loss": round(float(loss.detach()), 4)}


def peer_inference_rate(peer, uint8, *, device: str, warmup: int, steps: int) -> dict:
    """Images/s of the peer's forward pass (both heads) under bfloat16 autocast."""
    import torch

    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
        for _ in range(warmup):
            peer(uint8)
        _torch_sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            peer(uint8)
        _torch_sync(device)
    return {"images_per_s": rate(len(uint8) * steps, time.perf_counter() - start)}


def _torch_sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- main


def environment() -> dict:
    import jax
    import keras

    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S%z"), "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version(), "keras": keras.__version__, "keras_backend": keras.backend.backend(),
            "jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    with contextlib.suppress(AttributeError, IndexError):
        info["device_kind"] = jax.devices()[0].device_kind
    return info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_benchmark.json", help="JSON file to write (rewritten after each section)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that every section runs (CPU)")
    parser.add_argument("--cache-dir", help="folder for the decoded-image cache file (default: a temporary one)")
    parser.add_argument("--images", type=int, default=32768, help="images in the decoded cache (6.4 GB at 256 px)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.image_size, args.images, args.steps, args.warmup, args.workers = 75, 64, 2, 1, 2
        args.feature_batches, args.train_batches, args.threads, args.loader_batch = (8,), (8,), (1, 2), 16
    else:
        args.image_size, args.steps, args.warmup, args.workers = 256, 20, 3, min(16, os.cpu_count() or 1)
        args.feature_batches, args.train_batches, args.threads = (256, 512, 1024), (128, 256), (1, 4, 8, 16)
        args.loader_batch = 256
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sections = args.only or list(SECTIONS)
    result = {"environment": environment(), "settings": {k: v for k, v in vars(args).items() if k != "only"}}
    print(json.dumps(result["environment"]), flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu-benchmark-", dir=args.cache_dir) as folder:
        cache = None
        if set(sections) - {"matmul"}:
            start = time.perf_counter()
            cache = make_cache(Path(folder), count=args.images, image_size=args.image_size)
            result["cache"] = {"path": str(cache), "images": args.images, "bytes": cache.stat().st_size,
                               "write_s": round(time.perf_counter() - start, 1)}
        runners = {"matmul": lambda: bench_matmul(args), "loader": lambda: bench_loader(args, cache),
                   "features": lambda: bench_features(args, cache), "fine_tune": lambda: bench_fine_tune(args, cache),
                   "peer": lambda: bench_peer(args, cache)}
        for name in sections:
            print(f"{name} ...", flush=True)
            start = time.perf_counter()
            try:
                result[name] = runners[name]()
            except Exception as exc:  # record it and go on: one broken section must not lose the others
                result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
                print(f"  {name} failed: {result[name]['error']}", flush=True)
            result[name + "_seconds"] = round(time.perf_counter() - start, 1)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 1 if any(isinstance(result.get(s), dict) and "error" in result[s] for s in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
