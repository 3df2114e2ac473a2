"""The command line: one table of commands, every default taken from the library, fast help, one-line errors."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from multitask import cli
from multitask.settings import DemoConfig, GroupingParams, SyntheticSettings, TrainConfig


def parse(*argv: str):
    return cli.build_parser().parse_args(list(argv))


def test_help_lists_every_command_from_the_one_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for name, command in cli.COMMANDS.items():
        assert name in printed and command.help[:30] in printed


def test_train_defaults_are_train_configs_own():
    args = parse("train", "--out", "o", "--data", "d")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
                            if hasattr(args, f.name)})
    expected = TrainConfig(out="o", data="d")
    assert config == expected
    # every setting a user may want is a flag (verbose is the CLI's own -v, not a training setting)
    flags = {f.name for f in dataclasses.fields(TrainConfig)} - {"verbose"}
    assert flags <= set(vars(args)), flags - set(vars(args))


def test_other_commands_take_their_defaults_from_the_library():
    demo = parse("demo")
    assert {k: getattr(demo, k) for k in ("out", "weights", "per_class", "image_size", "epochs", "seed")} == {
        k: getattr(DemoConfig(), k) for k in ("out", "weights", "per_class", "image_size", "epochs", "seed")}
    data = parse("demo-data", "x")
    assert (data.per_class, data.size, data.seed) == (SyntheticSettings().per_class, SyntheticSettings().size,
                                                        SyntheticSettings().seed)
    audit = parse("audit-split", "s.csv")
    assert (audit.k, audit.min_inliers) == (GroupingParams().k, GroupingParams().min_inliers)
    scan = parse("scan", "d")
    assert (scan.split, scan.fractions, scan.seed) == (TrainConfig().split, TrainConfig().fractions,
                                                       TrainConfig().seed)


def test_building_the_parser_imports_neither_tensorflow_nor_pandas():
    code = ("import sys; from multitask import cli; cli.build_parser(); "
            "print(sorted(m for m in ('tensorflow', 'keras', 'pandas', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tensorflow_start_up_messages_are_silenced_unless_verbose(joint_run, demo_data, monkeypatch, tmp_path):
    """Issue 20: every command printed TensorFlow's C++ start-up lines (oneDNN, CUDA probing, an E-level cuInit
    error on a machine without a GPU). A real `predict` in its own process prints none of them now."""
    image = next(demo_data.rglob("*.jpg"))
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # conftest sets it for the tests
    done = subprocess.run([sys.executable, "-m", "multitask.cli", "predict", str(joint_run), str(image)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and "predicted 1 of 1 file(s)" in done.stdout, done.stderr[-2000:]
    noise = [line for line in done.stderr.splitlines()
             if re.match(r"[IWEF]\d{4} ", line) or "absl::InitializeLog" in line or "cuInit" in line]
    assert noise == []
    calls = []
    monkeypatch.setattr(cli, "quiet_tensorflow", lambda: calls.append(1))
    assert cli.main(["-v", "scan", str(tmp_path / "nowhere")]) == 2 and calls == []  # -v keeps everything
    assert cli.main(["scan", str(tmp_path / "nowhere")]) == 2 and calls == [1]


def test_library_errors_are_one_line_with_flags(tmp_path, capsys):
    rc = cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--image-size", "64"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["multitask train: error: --image-size 64 is below InceptionV3's minimum of 75 px"]
