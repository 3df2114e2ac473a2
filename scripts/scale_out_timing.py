"""Wall time of ``multitask train`` in one process vs two ``--strategy multiworker`` workers on this machine.

The same settings as ``tests/test_scale_out.py`` (synthetic demo data, 12 images per subclass, random-init backbone,
75 px, 8 epochs of the heads, global batch 32), each variant started as fresh processes with an empty feature
cache, one after the other. Prints the whole command's wall time and the frozen-feature phase (``timings.features``
in config.json; with two workers, each computes half and an all-reduce joins the halves).

    PYTHONPATH=$PWD python scripts/scale_out_timing.py            # the README's numbers
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--weights", "none", "--image-size", "75", "--epochs", "8", "--learning-rate", "3e-3", "--patience", "8"]


def start(args: list[str], out: Path, log: Path, tf_config: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    if tf_config:
        env["TF_CONFIG"] = json.dumps(tf_config)
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "multitask.cli", "train", *args, "--out", str(out)], env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def wait_all(processes: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in processes:
        p.wait(timeout=max(1.0, deadline - time.monotonic()))
    codes = [p.returncode for p in processes]
    if any(codes):
        raise SystemExit(f"training failed: exit codes {codes}")


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    from multitask.data import scan
    from multitask.splits import save_split, split_manifest
    from multitask.synthetic import generate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate(tmp / "demo", per_class=12, size=96, seed=0)
        split = save_split(split_manifest(scan(data), seed=42), tmp / "split.csv")
        common = ["--split-file", str(split), *SETTINGS]
        results = {}

        began = time.perf_counter()
        wait_all([start(common, tmp / "single", tmp / "single.log")], args.timeout)
        results["one process"] = (time.perf_counter() - began, tmp / "single")

        hosts = [f"127.0.0.1:{p}" for p in free_ports(args.workers)]
        began = time.perf_counter()
        wait_all([start([*common, "--strategy", "multiworker"], tmp / f"worker-{i}", tmp / f"worker-{i}.log",
                        {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}})
                  for i in range(args.workers)], args.timeout)
        results[f"{args.workers} workers"] = (time.perf_counter() - began, tmp / "worker-0")

        print(f"{'':<12} {'wall s':>8} {'features s':>11} {'heads s':>8} {'images':>7}  (cpus: {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f})")
        for name, (wall, run) in results.items():
            config = json.loads((run / "config.json").read_text())
            timings = config["timings"]
            print(f"{name:<12} {wall:8.1f} {timings['features']:11.1f} {timings['heads']:8.1f} "
                  f"{config['features']['images']:7d}")


if __name__ == "__main__":
    main()
