"""The synthetic demo data: layout, determinism, and that both tasks carry signal."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from multitask import cli
from multitask.synthetic import DEMO_ROOT, STYLES, generate, render
from multitask.taxonomy import ORGAN_LABELS, load_taxonomy


def _digest(root):
    return {p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*.jpg")}


def test_layout_names_and_determinism(tmp_path):
    a = generate(tmp_path / "a", per_class=2, size=80, seed=3)
    b = generate(tmp_path / "b", per_class=2, size=80, seed=3)
    c = generate(tmp_path / "c", per_class=2, size=80, seed=4)
    files = _digest(a)
    assert len(files) == 52
    for _, row in load_taxonomy().table.iterrows():
        for i in (1, 2):
            rel = (DEMO_ROOT / row["type_folder"] / row["subclass"] / f"{row['subclass']}_{i:04d}.jpg").as_posix()
            assert rel in files
    assert files == _digest(b)
    assert files != _digest(c)
    with Image.open(next(a.rglob("*.jpg"))) as im:
        assert im.size == (80, 80) and im.format == "JPEG"


def test_every_organ_has_a_style():
    assert set(STYLES) == set(ORGAN_LABELS)


def test_malignant_images_are_darker_on_average_but_overlap():
    """Within an organ the classes differ in distribution, not deterministically per image."""
    rng = np.random.default_rng(0)
    for organ in ("Breast", "Cervix", "Lung", "Mouth"):
        benign = [render(organ, False, 0, rng, 64).mean() for _ in range(30)]
        malignant = [render(organ, True, 0, rng, 64).mean() for _ in range(30)]
        assert np.mean(malignant) < np.mean(benign), organ
        assert np.std(benign) > 0 and np.std(malignant) > 0


def test_demo_data_cli(tmp_path, capsys):
    assert cli.main(["demo-data", str(tmp_path), "--per-class", "1", "--size", "80", "--with-bad-files"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert len(list(tmp_path.rglob("*.jpg"))) == 26 + 4
    # SYNTHETIC.txt marks the dataset; notes.txt is one of the planted bad files.
    assert sorted(p.name for p in tmp_path.rglob("*.txt")) == ["SYNTHETIC.txt", "notes.txt"]
