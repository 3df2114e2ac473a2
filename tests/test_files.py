"""Writing files safely: atomic or not at all, one writer per kind, stale temporary files, free space."""

from __future__ import annotations

import errno
import math

import pytest
from matplotlib.figure import Figure
from PIL import Image

from multitask.files import (
    TEMP_TAG,
    atomic_path,
    check_free_space,
    remove_stale_temps,
    save_figure,
    write_csv,
    write_json,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "config.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_temporary_names_keep_the_whole_suffix_and_are_recognisable(tmp_path):
    with atomic_path(tmp_path / "latest.weights.h5") as tmp:
        assert tmp.name.startswith(f".latest{TEMP_TAG}") and tmp.name.endswith(".weights.h5")
        tmp.write_bytes(b"x")
    assert (tmp_path / "latest.weights.h5").read_bytes() == b"x"


def test_json_refuses_nan_instead_of_writing_invalid_json(tmp_path):
    target = tmp_path / "metrics.json"
    write_json({"accuracy": 0.9}, target)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json({"accuracy": math.nan}, target)
    assert target.read_text() == '{\n  "accuracy": 0.9\n}\n'


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    keep = [tmp_path / "model.keras", tmp_path / ".hidden_user_file", tmp_path / "notes.tmp"]
    stale = [tmp_path / f".model{TEMP_TAG}abc123.keras", tmp_path / f".history{TEMP_TAG}x.csv"]
    for path in keep + stale:
        path.write_text("x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)


def test_figures_and_tables_are_written_whole(tmp_path):
    fig = Figure(figsize=(2, 1))
    fig.add_subplot().plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png", dpi=50)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (100, 50)  # 2 x 1 inches at 50 dpi

    import pandas as pd

    csv = write_csv(pd.DataFrame({"a": [1, 2]}), tmp_path / "t.csv")
    assert csv.read_text() == "a\n1\n2\n"


def test_free_space_check_names_the_folder_and_the_need(tmp_path):
    check_free_space(tmp_path, 1, what="a test")
    with pytest.raises(OSError) as info:
        check_free_space(tmp_path / "not" / "yet", 2**62, what="training")
    assert info.value.errno == errno.ENOSPC and f"free under {tmp_path}" in info.value.strerror
    assert "training needs about" in info.value.strerror
