"""Sibling detection, the leakage-aware split and the split audit, on data with planted (known) siblings."""

from __future__ import annotations

import json
import shutil
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask import cli
from multitask import grouping as grouping_module
from multitask.audit import audit_split, count_cross_split_pairs, cross_split_counts, read_split_table
from multitask.data import scan
from multitask.errors import DataError
from multitask.grouping import connected_groups, feature_key, find_sibling_groups
from multitask.settings import GroupingParams
from multitask.splits import load_split, save_split, split_manifest
from multitask.synthetic import augment_like_kaggle, generate_with_siblings

SUBCLASSES = ["brain_glioma", "breast_benign", "lung_aca", "lymph_cll"]  # grey MRI/mammogram and colour histology
SOURCES, SIBLINGS = 6, 4


def planted_pairs(truth: pd.Series) -> np.ndarray:
    """Row-position pairs that share a planted source."""
    return np.array([p for rows in truth.groupby(truth).indices.values() for p in combinations(rows, 2)])


def pairwise_precision_recall(groups: np.ndarray, truth: pd.Series) -> tuple[float, float]:
    """Of the pairs put in one group, the share that are planted siblings; of the planted pairs, the share found."""
    same_group = groups[:, None] == groups[None, :]
    source = truth.to_numpy()
    same_source = source[:, None] == source[None, :]
    upper = np.triu_indices(len(groups), 1)
    found, true = same_group[upper], same_source[upper]
    return (found & true).sum() / max(found.sum(), 1), (found & true).sum() / max(true.sum(), 1)


@pytest.fixture(scope="module")
def siblings(tmp_path_factory):
    """96 synthetic images: 4 subclasses x 6 sources x 4 augmented siblings; manifest and truth in row order."""
    out = tmp_path_factory.mktemp("siblings")
    truth = generate_with_siblings(out, sources_per_class=SOURCES, siblings_per_source=SIBLINGS, size=160,
                                   seed=1, subclasses=SUBCLASSES)
    manifest = scan(out)
    return manifest, manifest["path"].map(truth)


@pytest.fixture(scope="module")
def grouping(siblings, tmp_path_factory):
    manifest, _ = siblings
    return find_sibling_groups(manifest, cache_dir=tmp_path_factory.mktemp("cache"), workers=2)


def test_generator_plants_shuffled_siblings_deterministically(tmp_path):
    a = generate_with_siblings(tmp_path / "a", sources_per_class=2, siblings_per_source=3, size=96,
                               subclasses=["lung_aca"])
    b = generate_with_siblings(tmp_path / "b", sources_per_class=2, siblings_per_source=3, size=96,
                               subclasses=["lung_aca"])
    assert len(a) == 6 and sorted(pd.Series(a).value_counts()) == [3, 3]
    names = {Path(p).name: s for p, s in a.items()}
    assert sorted(names) == [f"lung_aca_{i:04d}.jpg" for i in range(1, 7)]
    assert {Path(p).name: s for p, s in b.items()} == names
    assert all(Path(p).read_bytes() == (tmp_path / "b" / Path(p).relative_to(tmp_path / "a")).read_bytes() for p in a)


def test_groups_match_planted_siblings(siblings, grouping):
    manifest, truth = siblings
    precision, recall = pairwise_precision_recall(grouping.groups, truth)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert len(grouping.groups) == len(manifest) and not grouping.featureless
    assert grouping.summary()["groups"] == pytest.approx(len(SUBCLASSES) * SOURCES, abs=2)
    # the threshold separates: verified links are planted pairs, and rejected candidates are far below it
    source = truth.to_numpy()
    is_planted = source[grouping.pairs["a"]] == source[grouping.pairs["b"]]
    assert grouping.pairs.loc[~is_planted, "inliers"].max() < GroupingParams.min_inliers
    assert grouping.pairs.loc[grouping.pairs["sibling"], "a"].size > 0


def test_candidates_stay_within_subclass(siblings, grouping):
    manifest, _ = siblings
    subclass = manifest["subclass"].to_numpy()
    assert (subclass[grouping.pairs["a"]] == subclass[grouping.pairs["b"]]).all()


def test_verification_work_grows_linearly_not_with_all_pairs(siblings, monkeypatch):
    """Doubling the images per subclass doubles the geometric checks; checking all pairs would quadruple them."""
    manifest, _ = siblings
    calls = []
    real = grouping_module.count_inliers
    monkeypatch.setattr(grouping_module, "count_inliers", lambda *args: calls.append(1) or real(*args))
    half = manifest.groupby("subclass").head(SOURCES * SIBLINGS // 2)
    params = GroupingParams(k=4)
    find_sibling_groups(half, params=params, workers=1)
    small = len(calls)
    calls.clear()
    find_sibling_groups(manifest, params=params, workers=1)
    all_pairs_ratio = (24 * 23 / 2) / (12 * 11 / 2)  # 4.2
    assert 1.5 < len(calls) / small < 2.5 < all_pairs_ratio, (small, len(calls))


def test_grouped_split_keeps_planted_siblings_together_random_does_not(siblings, tmp_path):
    manifest, truth = siblings
    grouped = split_manifest(manifest, seed=3, cache_dir=tmp_path / "cache", workers=2)  # the default method
    random = split_manifest(manifest, seed=3, method="random")
    pairs = planted_pairs(truth)
    assert sum(cross_split_counts(pairs, grouped["split"]).values()) == 0
    assert sum(cross_split_counts(pairs, random["split"]).values()) > 20
    # whole groups per split, every file once, near the requested fractions in every subclass
    assert (grouped.groupby("group")["split"].nunique() == 1).all()
    assert grouped["path"].tolist() == manifest["path"].tolist()
    per_subclass = pd.crosstab(grouped["subclass"], grouped["split"])[["train", "val", "test"]]
    assert (per_subclass == [16, 4, 4]).all(axis=None)  # 24 images in groups of 4: the closest to 70/15/15
    assert set(grouped["split_method"]) == {"grouped"}
    assert set(grouped["split_min_inliers"]) == {GroupingParams.min_inliers}
    assert set(random["split_method"]) == {"random"} and "group" not in random


def test_grouped_split_is_deterministic_and_saved(siblings, grouping, tmp_path):
    manifest, _ = siblings
    first = split_manifest(manifest, seed=5, groups=grouping.groups)
    again = split_manifest(manifest, seed=5, groups=grouping.groups)
    other = split_manifest(manifest, seed=6, groups=grouping.groups)
    assert first["split"].tolist() == again["split"].tolist() != other["split"].tolist()
    assert count_cross_split_pairs(grouping, first["split"]) == {"train-val": 0, "train-test": 0, "val-test": 0}
    loaded = load_split(save_split(first, tmp_path / "split.csv"))
    assert loaded["group"].tolist() == first["group"].tolist() and set(loaded["split_method"]) == {"grouped"}


def test_inlier_count_is_the_same_in_both_directions(siblings, grouping):
    """The grouping verifies (a, b) in row order, the audit (earlier split, later split): one count for both. A
    one-sided ratio test gives different counts (real sample: lung_bnt_0020 -> 0021 22 inliers, 0021 -> 0020 36),
    which let the grouped split and `audit-split` disagree about a pair."""
    manifest, _ = siblings
    params = GroupingParams()
    keypoints = grouping_module.load_keypoints(manifest["path"].tolist(), params=params, workers=2)
    pairs = grouping.pairs[["a", "b"]].to_numpy()[:60]
    one_sided = [(grouping_module._directed_inliers(keypoints[a], keypoints[b], params),
                  grouping_module._directed_inliers(keypoints[b], keypoints[a], params)) for a, b in pairs]
    assert any(x != y for x, y in one_sided)  # what the two-sided count has to reconcile
    for (a, b), (x, y) in zip(pairs, one_sided, strict=True):
        assert grouping_module.count_inliers(keypoints[a], keypoints[b], params) == max(x, y)
        assert grouping_module.count_inliers(keypoints[b], keypoints[a], params) == max(x, y)


def test_grouped_split_passes_its_own_audit_even_when_the_candidates_miss_siblings(siblings, monkeypatch, tmp_path):
    """The grouped split audits itself with `audit-split`'s code: here the grouping proposes no pair at all, so
    only the audit's rounds can join siblings, and the split they leave is clean under the same audit."""
    manifest, truth = siblings
    monkeypatch.setattr(grouping_module, "propose_pairs", lambda keypoints, params: np.zeros((0, 2), np.int64))
    split = split_manifest(manifest, seed=3, cache_dir=tmp_path / "cache", workers=2)
    monkeypatch.undo()
    assert split["group"].nunique() < len(manifest)  # the audit joined groups
    assert (split.groupby("group")["split"].nunique() == 1).all()
    assert sum(cross_split_counts(planted_pairs(truth), split["split"]).values()) == 0
    audit = audit_split(split, cache_dir=tmp_path / "cache", workers=2)
    assert audit.pairs.empty and sum(audit.counts.values()) == 0


def test_default_split_of_the_real_sample_passes_its_audit(real_split_csv):
    """Issue 20: the default grouped split (seed 42) let lung_bnt_0021 (train) / 0020 (val) cross, 36 inliers, which
    `multitask audit-split` with the same settings found. Now the audit of that split finds nothing."""
    frame = read_split_table(real_split_csv)
    audit = audit_split(frame, cache_dir=real_split_csv.parent / "keypoints", workers=2)
    assert audit.counts == {"train-val": 0, "train-test": 0, "val-test": 0}, audit.pairs.head()
    pair = frame[frame["path"].str.contains("lung_bnt_002[01]", regex=True)]
    assert pair["split"].nunique() <= 1


def test_grouped_split_of_singletons_meets_the_fractions_overall(demo_data):
    """12 images per subclass cannot each be 70/15/15; the rounding must not pile up (8/2/2 everywhere = 67%)."""
    manifest = scan(demo_data)
    split = split_manifest(manifest, groups=np.arange(len(manifest)), seed=1)
    shares = split["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) < 0.01 and abs(shares["val"] - 0.15) < 0.01
    assert (pd.crosstab(split["subclass"], split["split"])[["val", "test"]] >= 1).all(axis=None)
    no_val = split_manifest(manifest, groups=np.arange(len(manifest)), fractions=(0.8, 0.0, 0.2))
    assert set(no_val["split"]) == {"train", "test"}


def test_group_split_edge_cases(siblings, caplog):
    manifest, _ = siblings
    one_big_group = split_manifest(manifest, groups=np.zeros(len(manifest), int))
    assert one_big_group["split"].nunique() == 1 and "too few sibling groups" in caplog.text
    tiny = manifest.groupby("subclass").head(2)  # 2 images per subclass: all go to train
    assert set(split_manifest(tiny, groups=np.arange(len(tiny)))["split"]) == {"train"}
    with pytest.raises(DataError, match="group ids"):
        split_manifest(manifest, groups=[0, 1])


def test_connected_groups_number_components_by_first_row():
    groups = connected_groups(6, np.array([[4, 5], [1, 3], [3, 4]]))
    assert groups.tolist() == [0, 1, 2, 1, 1, 1]


def test_keypoint_cache_is_reused_and_invalidated(siblings, tmp_path):
    manifest, _ = siblings
    (tmp_path / "images").mkdir()
    rows = manifest.head(6).assign(path=[shutil.copy(p, tmp_path / "images") for p in manifest["path"].head(6)])
    cache = tmp_path / "cache"
    first = find_sibling_groups(rows, cache_dir=cache, workers=1)
    files = sorted(cache.rglob("*.npz"))
    assert len(files) == 6 and files[0].parent.name == feature_key(GroupingParams())
    again = find_sibling_groups(rows, cache_dir=cache, workers=1)
    assert np.array_equal(first.groups, again.groups) and len(list(cache.rglob("*.npz"))) == 6
    Image.open(rows["path"].iloc[0]).rotate(90).save(rows["path"].iloc[0])  # a changed file gets a new entry
    find_sibling_groups(rows, cache_dir=cache, workers=1)
    assert len(list(cache.rglob("*.npz"))) == 7


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "lung_aca_0001.jpg"
    bad.write_text("not an image")
    with pytest.raises(DataError, match="lung_aca_0001.jpg"):
        find_sibling_groups(pd.DataFrame({"path": [str(bad)], "subclass": ["lung_aca"]}))


def test_real_images_augmented_are_grouped_and_not_merged(real_sample, tmp_path):
    """Kaggle-style siblings of real brain MRIs (subclasses without siblings of their own in the sample)."""
    rng = np.random.default_rng(0)
    rows = []
    for subclass in ("brain_menin", "brain_tumor"):
        originals = sorted(real_sample.rglob(f"{subclass}/*.png"))
        folder = tmp_path / subclass
        folder.mkdir()
        for s, source in enumerate(originals[:10]):
            pixels = np.asarray(Image.open(source).convert("L"))
            copies = SIBLINGS if s < 6 else 1  # the last four are unrelated distractors
            for c in range(copies):
                path = folder / f"{source.stem}_{c}.jpg"
                Image.fromarray(augment_like_kaggle(pixels, rng)).save(path, quality=90)
                rows.append((str(path), subclass, f"{subclass}/{source.stem}"))
    frame = pd.DataFrame(rows, columns=["path", "subclass", "source"])
    result = find_sibling_groups(frame, workers=2)
    precision, recall = pairwise_precision_recall(result.groups, frame["source"])
    assert precision == 1.0 and recall >= 0.9, (precision, recall)


def test_audit_split_cli_on_a_bare_path_split_csv(siblings, tmp_path, capsys):
    """A split from another tool: relative paths, no subclass; a random split leaks, a grouped one does not."""
    manifest, _ = siblings
    random = split_manifest(manifest, seed=0, method="random")
    root = Path(manifest["path"].iloc[0]).parents[4]
    bare = pd.DataFrame({"path": [Path(p).relative_to(root).as_posix() for p in random["path"]],
                         "split": random["split"]})
    bare.to_csv(root / "other_tool.csv", index=False)
    assert cli.main(["audit-split", str(root / "other_tool.csv"), "--out", str(tmp_path / "audit")]) == 0
    printed = capsys.readouterr().out
    assert "whole set" in printed and "train-test" in printed
    report = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert report["cross_split_pairs"]["train-test"] > 5 and report["leaked_images"]["test"] > 5
    assert report["worst"][0]["inliers"] >= report["worst"][-1]["inliers"] >= GroupingParams.min_inliers
    with Image.open(tmp_path / "audit" / "audit_pairs.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[1] > 400

    clean = root / "grouped.csv"
    save_split(split_manifest(manifest, groups=find_sibling_groups(manifest, workers=2).groups), clean)
    assert cli.main(["audit-split", str(clean)]) == 0  # default --out: grouped_audit/ next to the CSV
    report = json.loads((root / "grouped_audit" / "audit.json").read_text())
    assert sum(report["cross_split_pairs"].values()) == 0 and (root / "grouped_audit" / "audit_pairs.png").is_file()


def test_audit_split_cli_errors_are_one_line(tmp_path, capsys):
    csv = tmp_path / "split.csv"
    pd.DataFrame({"path": ["a.jpg"]}).to_csv(csv, index=False)
    assert cli.main(["audit-split", str(csv)]) == 2
    assert "missing column(s) split" in capsys.readouterr().err
    pd.DataFrame({"path": ["gone.jpg"], "split": ["train"]}).to_csv(csv, index=False)
    assert cli.main(["audit-split", str(csv)]) == 2
    assert "gone.jpg" in capsys.readouterr().err
