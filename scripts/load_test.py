"""Load test of `multitask serve`: concurrent single-image clients against 127.0.0.1, beside offline `predict`.

Starts ``multitask serve RUN`` in a subprocess on a free localhost port, waits for ``/health``, then:

1. offline: ``Predictor.predict_files`` (batch 32) on the very image list the clients will send, in this process,
   while the server idles;
2. load: ``--clients`` threads (default 8) send ``--requests`` (default 200) single-image ``POST /predict``
   requests back to back, the images taken in turn from the run's own test and val images (or ``--images``);

and repeats the pair ``--rounds`` times (default 3), interleaved, so that a busy neighbour on a shared machine
slows both sides of a round alike. It prints each round and the medians: throughput (images/s), p50/p95 latency,
the mean batch the micro-batcher formed (from ``/health``), failures, and served images/s as a multiple of offline
images/s (the target is >= 0.8x with no failure); ``--out`` writes it all as JSON. Usage::

    python scripts/load_test.py RUN [--engine keras|onnx] [--clients 8] [--requests 200] [--rounds 3]

The clients run on the server's machine and take some of its CPU, as they would in any one-machine test.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def image_list(run: str, images: str | None, n: int) -> list[str]:
    """``n`` image files, cycling over the given folder or the run's test+val images."""
    from multitask.predict import collect_images
    from multitask.rundir import open_run
    from multitask.splits import load_split

    if images:
        pool = collect_images([images])
    else:
        info = open_run(run)
        manifest = load_split(info.split_path, taxonomy=info.taxonomy)
        pool = manifest[manifest["split"].isin(["test", "val"])]["path"].tolist()
    if not pool:
        sys.exit("no images to send")
    return [pool[i % len(pool)] for i in range(n)]


def start_server(run: str, engine: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), TF_CPP_MIN_LOG_LEVEL="2")
    server = subprocess.Popen([sys.executable, "-m", "multitask.cli", "serve", run, "--port", str(port),
                               "--engine", engine], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the server exited: {server.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.kill()
    sys.exit("the server did not answer /health within 300 s")


def offline(predictor, files: list[str]) -> float:
    """Images/s of Predictor.predict_files (batch 32) on ``files``."""
    start = time.perf_counter()
    frame = predictor.predict_files(files, progress=False)
    seconds = time.perf_counter() - start
    assert frame["error"].isna().all()
    return len(files) / seconds


def load(url: str, files: list[str], clients: int) -> dict:
    """Send one request per file from ``clients`` threads; latency of each, failures, wall time."""
    import httpx

    payloads = [(Path(f).name, Path(f).read_bytes()) for f in files]
    latencies, failures, lock, next_index = [], [], threading.Lock(), iter(range(len(payloads)))

    def client():
        with httpx.Client(timeout=60) as http:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                name, data = payloads[i]
                start = time.perf_counter()
                try:
                    response = http.post(f"{url}/predict", files=[("files", (name, data, "image/jpeg"))])
                    ok = response.status_code == 200 and response.json()["results"][0]["error"] is None
                    why = None if ok else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    why = repr(exc)
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    if why:
                        failures.append(why)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(files), "clients": clients, "seconds": wall, "images_per_s": len(files) / wall,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "max_ms": float(ms.max()), "failures": len(failures), "failure_examples": failures[:3]}


def batching(url: str) -> tuple[int, int]:
    import httpx

    counts = httpx.get(f"{url}/health", timeout=30).json()["batching"]
    return counts["forward_passes"], counts["images"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--engine", default="keras", choices=("keras", "onnx"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="offline/served pairs, interleaved (default 3)")
    parser.add_argument("--images", help="folder or glob of images to send (default: the run's test+val images)")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from multitask.predict import Predictor

    files = image_list(args.run, args.images, args.requests)
    port = free_port()
    server = start_server(args.run, args.engine, port)
    url = f"http://127.0.0.1:{port}"
    rounds = []
    try:
        predictor = Predictor.from_run(args.run, engine=args.engine)
        offline(predictor, files[:32])  # warm-up: trace the forward pass
        load(url, files[: 2 * args.clients], args.clients)  # warm-up of the server's path
        for _ in range(args.rounds):  # interleaved: a busy neighbour slows both sides of a round alike
            reference = offline(predictor, files)
            passes, images = batching(url)
            served = load(url, files, args.clients)
            passes_after, images_after = batching(url)
            served.update(offline_images_per_s=reference, ratio=served["images_per_s"] / reference,
                          mean_batch=(images_after - images) / max(1, passes_after - passes))
            rounds.append(served)
            print(f"round {len(rounds)}: served {served['images_per_s']:.1f} images/s (p50 {served['p50_ms']:.0f} "
                  f"ms, p95 {served['p95_ms']:.0f} ms, mean batch {served['mean_batch']:.1f}, failures "
                  f"{served['failures']}), offline {reference:.1f} images/s: {served['ratio']:.2f}x", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    median = {key: float(np.median([r[key] for r in rounds])) for key in
              ("images_per_s", "offline_images_per_s", "ratio", "p50_ms", "p95_ms", "mean_batch")}
    failures = sum(r["failures"] for r in rounds)
    print(f"{args.run} ({args.engine} engine, {predictor.image_size} px, {os.cpu_count()} CPUs), median of "
          f"{len(rounds)} rounds of {args.requests} single-image requests from {args.clients} clients:")
    print(f"served  {median['images_per_s']:.1f} images/s, latency p50 {median['p50_ms']:.0f} ms, p95 "
          f"{median['p95_ms']:.0f} ms, mean batch {median['mean_batch']:.1f}; failures {failures}")
    print(f"offline {median['offline_images_per_s']:.1f} images/s (Predictor.predict_files, batch 32)")
    verdict = "PASS" if median["ratio"] >= 0.8 and not failures else "BELOW TARGET"
    print(f"served / offline = {median['ratio']:.2f} (target >= 0.8, no failures): {verdict}")
    if args.out:
        from multitask.files import write_json

        summary = {"run": str(args.run), "engine": args.engine, "image_size": predictor.image_size,
                   "cpus": os.cpu_count(), "clients": args.clients, "requests": args.requests, "median": median,
                   "failures": failures, "rounds": rounds}
        print(f"wrote {write_json(summary, args.out)}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
