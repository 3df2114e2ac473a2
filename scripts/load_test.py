"""Load test of `multitask serve`: concurrent single-image clients against 127.0.0.1, beside offline `predict`.

Starts ``multitask serve RUN`` in a subprocess on a free localhost port, waits for ``/health``, then:

1. offline: ``Predictor.predict_files`` (batch 32) on the very image list the clients will send, in this process,
   while the server idles; measured before and after the load, their mean is the reference;
2. load: ``--clients`` threads (default 8) send ``--requests`` (default 200) single-image ``POST /predict``
   requests back to back, the images taken in turn from the run's own test and val images (or ``--images``).

It prints throughput (images/s), p50/p95/max latency, failures and the throughput as a multiple of offline images/s
(the target is >= 0.8x with no failure), and with ``--out`` writes the numbers as JSON. Usage::

    python scripts/load_test.py RUN [--engine keras|onnx] [--clients 8] [--requests 200] [--images DIR]

The clients share the machine with the server; on a small machine that costs the server some CPU.
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
    from multitask.data import load_split
    from multitask.predict import collect_images
    from multitask.rundir import open_run

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run directory")
    parser.add_argument("--engine", default="keras", choices=("keras", "onnx"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--images", help="folder or glob of images to send (default: the run's test+val images)")
    parser.add_argument("--out", help="also write the numbers to this JSON file")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from multitask.predict import Predictor

    files = image_list(args.run, args.images, args.requests)
    port = free_port()
    server = start_server(args.run, args.engine, port)
    url = f"http://127.0.0.1:{port}"
    try:
        predictor = Predictor.from_run(args.run, engine=args.engine)
        offline(predictor, files[:32])  # warm-up: trace the forward pass
        before = offline(predictor, files)
        load(url, files[: 2 * args.clients], args.clients)  # warm-up of the server's path
        result = load(url, files, args.clients)
        after = offline(predictor, files)
    finally:
        server.terminate()
        server.wait(30)
    reference = (before + after) / 2
    result.update(engine=args.engine, image_size=predictor.image_size, offline_images_per_s=reference,
                  offline_runs=[before, after], ratio=result["images_per_s"] / reference, cpus=os.cpu_count())
    print(f"{args.run} ({args.engine} engine, {predictor.image_size} px, {os.cpu_count()} CPUs)")
    print(f"served  {result['images_per_s']:.1f} images/s: {result['requests']} single-image requests from "
          f"{result['clients']} clients in {result['seconds']:.1f} s; failures {result['failures']}")
    print(f"latency p50 {result['p50_ms']:.0f} ms, p95 {result['p95_ms']:.0f} ms, max {result['max_ms']:.0f} ms")
    print(f"offline {reference:.1f} images/s (Predictor.predict_files, batch 32; {before:.1f} before, "
          f"{after:.1f} after the load)")
    verdict = "PASS" if result["ratio"] >= 0.8 and not result["failures"] else "BELOW TARGET"
    print(f"served / offline = {result['ratio']:.2f} (target >= 0.8, no failures): {verdict}")
    if args.out:
        from multitask.files import write_json

        print(f"wrote {write_json(result, args.out)}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
