"""Scale-out: two real ``multitask train --strategy multiworker`` processes on 127.0.0.1, and sharded prediction.

The multi-worker test starts the module form of the command (``python -m multitask.cli``, with this checkout on
PYTHONPATH, so it runs the code under test in any virtual environment), each process with its own TF_CONFIG, and
compares the chief's run with a single-process run of the same settings and global batch size. It is bounded in
time and kills both workers as soon as one fails, so it cannot hang.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import IMAGE_SIZE, JOINT_SETTINGS

from multitask import cli
from multitask.predict import Predictor, write_predictions
from multitask.rundir import open_run
from multitask.shards import Shard, predict_shard
from multitask.splits import load_split

REPO = Path(__file__).resolve().parents[1]
WORKERS = 2
CLUSTER_TIMEOUT_S = 300  # a healthy run takes ~1 minute on 2 shared cores; a hung collective never ends
ACCURACY_TOLERANCE = 0.05


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_cluster(commands: list[list[str]], *, timeout: float, logs: Path) -> list[int]:
    """Start one process per command, worker i with TF_CONFIG task index i; wait for all of them. If one exits
    with an error, or ``timeout`` passes, the others are killed; returns the exit codes (None: killed)."""
    hosts = [f"127.0.0.1:{port}" for port in free_ports(len(commands))]
    processes = []
    for index, command in enumerate(commands):
        # One thread each: two workers share this machine's cores (measured: feature phase 12 s instead of 22 s).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
               "TF_CONFIG": json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": index}})}
        with open(logs / f"worker-{index}.log", "wb") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                break  # the others would wait for it forever in their next all-reduce
            time.sleep(0.2)
    finally:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    return [None if p.returncode == -signal.SIGKILL else p.returncode for p in processes]


def log_tail(logs: Path, lines: int = 15) -> str:
    return "\n".join(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
                     for path in sorted(logs.glob("*.log")))


def accuracy_on_test_split(predictor: Predictor, run: Path) -> dict[str, float]:
    """Accuracy per head of ``predictor`` on ``run``'s test split."""
    info = open_run(run)
    test = load_split(info.split_path, taxonomy=info.taxonomy).query("split == 'test'")
    frame = predictor.predict_files(test["path"].tolist(), progress=False)
    return {task: float((frame[task].to_numpy() == test[task].to_numpy()).mean()) for task in info.tasks}


def test_multiworker_training_matches_one_process(demo_split_csv, joint_run, joint_predictor, tmp_path):
    """The reference is the session's joint run: one process, the same settings and global batch size."""
    single_process_run = joint_run
    outs = [tmp_path / f"worker-{i}" for i in range(WORKERS)]
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in JOINT_SETTINGS.items()]
    commands = [[sys.executable, "-m", "multitask.cli", "train", "--strategy", "multiworker", "--split-file",
                 str(demo_split_csv), "--weights", "none", "--image-size", str(IMAGE_SIZE), *flags, "--out", str(out)]
                for out in outs]
    codes = run_cluster(commands, timeout=CLUSTER_TIMEOUT_S, logs=tmp_path)
    assert codes == [0] * WORKERS, f"exit codes {codes} (None: killed)\n{log_tail(tmp_path)}"

    # Only the chief (worker 0) writes a run; the other worker's --out is never created.
    chief = open_run(outs[0])
    assert not outs[1].exists(), sorted(p.name for p in outs[1].rglob("*"))
    assert chief.config["settings"]["strategy"] == "multiworker"

    # Frozen-phase features: each worker computed half, an all-reduce combined them; they equal one process's.
    reference = open_run(single_process_run)
    shared, single = Path(chief.config["features"]["cache"]), Path(reference.config["features"]["cache"])
    assert not chief.config["features"]["reused"] and shared.name == single.name  # the same cache key
    with np.load(shared) as a, np.load(single) as b:
        np.testing.assert_array_equal(a["rows"], b["rows"])
        np.testing.assert_allclose(a["values"], b["values"], rtol=1e-4, atol=1e-7)
        # the OOD detector's blocks, computed in the same pass and combined the same way
        assert sorted(a.files) == sorted(b.files) and "extra_mixed5" in a.files
        np.testing.assert_allclose(a["extra_mixed5"], b["extra_mixed5"], rtol=1e-4, atol=1e-6)
    assert chief.config["ood"]["features_from"] == "the training feature pass"

    # The chief's run loads and predicts, about as well as the single-process run (same global batch size).
    assert chief.config["epochs"]["heads"] == reference.config["epochs"]["heads"]
    accuracy = accuracy_on_test_split(Predictor.from_run(chief), chief.path)
    expected = accuracy_on_test_split(joint_predictor, single_process_run)
    for task, value in expected.items():
        assert value > 0.5, f"the reference run did not learn {task} ({value:.3f}): the comparison would be void"
        assert abs(accuracy[task] - value) <= ACCURACY_TOLERANCE, (task, accuracy[task], value)


# ----------------------------------------------------------------------------------------------- sharded predict


@pytest.fixture(scope="module")
def test_images(demo_split_csv) -> list[str]:
    split = pd.read_csv(demo_split_csv)
    return split.loc[split["split"] == "test", "path"].tolist()


@pytest.fixture(scope="module")
def shard_parts(joint_run, joint_predictor, test_images, tmp_path_factory) -> list[Path]:
    """predict --shard K/3 for K = 1..3, as three machines would run them (the first through the command, the
    others through the library with the session's loaded model, to save loading it again), plus the unsharded
    run."""
    out = tmp_path_factory.mktemp("shards")
    assert cli.main(["predict", str(joint_run), *test_images, "--shard", "1/3", "--out", str(out / "part-1.csv")]) == 0
    predictor = joint_predictor
    for k in (2, 3):
        write_predictions(predict_shard(predictor, test_images, Shard(k, 3)), out / f"part-{k}.csv")
    write_predictions(predictor.predict_files(test_images), out / "unsharded.csv")
    return [out / f"part-{k}.csv" for k in range(1, 4)]


def test_shards_merged_equal_one_unsharded_run(shard_parts, test_images, tmp_path):
    parts = [pd.read_csv(p) for p in shard_parts]
    assert [len(p) for p in parts] == [b - a for a, b in (Shard(k, 3).bounds(len(test_images)) for k in (1, 2, 3))]
    assert [set(p["shard"]) for p in parts] == [{"1/3"}, {"2/3"}, {"3/3"}]
    merged = tmp_path / "all.csv"
    assert cli.main(["predict", "--merge", *map(str, reversed(shard_parts)), "--out", str(merged)]) == 0
    unsharded = pd.read_csv(shard_parts[0].parent / "unsharded.csv").sort_values("path", ignore_index=True)
    # Decisions and paths exactly; numbers up to float32 rounding, which depends on which images share a batch
    # (ood_score's whitening shows it most: ~3e-6 on scores of magnitude 1-10).
    pd.testing.assert_frame_equal(pd.read_csv(merged), unsharded, check_exact=False, rtol=1e-5, atol=1e-4)


def test_merge_names_a_missing_shard(shard_parts, tmp_path, capsys):
    code = cli.main(["predict", "--merge", str(shard_parts[0]), str(shard_parts[2]), "--out", str(tmp_path / "a.csv")])
    error = capsys.readouterr().err
    assert code == 2 and "shard 2/3" in error and "is missing" in error, error
    assert not (tmp_path / "a.csv").exists()


def test_merge_names_a_duplicated_input(shard_parts, tmp_path, capsys):
    part = pd.read_csv(shard_parts[1])
    doubled = tmp_path / "part-2-doubled.csv"  # one of part 3's rows pasted into part 2 as well
    pd.concat([part, pd.read_csv(shard_parts[2]).head(1).assign(shard="2/3")]).to_csv(doubled, index=False)
    code = cli.main(["predict", "--merge", str(shard_parts[0]), str(doubled), str(shard_parts[2]),
                     "--out", str(tmp_path / "a.csv")])
    error = capsys.readouterr().err
    assert code == 2 and "appears twice" in error and "part-2-doubled.csv" in error, error


def test_shard_is_parsed_strictly():
    from multitask.errors import ConfigError

    assert Shard.parse("2/3") == Shard(2, 3) and str(Shard(2, 3)) == "2/3"
    for text in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ConfigError, match="K/N"):
            Shard.parse(text)
    assert [Shard(k, 3).bounds(10) for k in (1, 2, 3)] == [(0, 3), (3, 6), (6, 10)]


def test_multiworker_without_tf_config_is_refused(demo_split_csv, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    code = cli.main(["train", "--strategy", "multiworker", "--split-file", str(demo_split_csv), "--weights", "none",
                     "--image-size", str(IMAGE_SIZE), "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err
    assert code == 2 and "TF_CONFIG" in error and "--strategy multiworker" in error, error
    assert not (tmp_path / "run").exists()
