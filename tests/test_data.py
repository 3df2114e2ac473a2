"""Folders -> manifest -> split -> tf.data."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multitask import cli
from multitask.data import IMAGE_EXTENSIONS, counts_table, make_dataset, scan, scan_tree
from multitask.errors import ConfigError, DataError
from multitask.splits import load_split, save_split, split_manifest
from multitask.synthetic import BAD_FILE_NAMES, DEMO_ROOT, generate

PER_CLASS = 4


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory):
    """A small synthetic tree (current Kaggle layout) with the planted bad files."""
    return generate(tmp_path_factory.mktemp("bad"), per_class=PER_CLASS, size=80, with_bad_files=True)


def test_scan_current_layout_labels_every_file(bad_tree):
    manifest = scan(bad_tree)
    # 26 x 4 good files + the 4 planted .jpg files (empty, truncated, text, PNG) until --verify drops them
    assert len(manifest) == 26 * PER_CLASS + 4
    assert list(manifest.columns) == ["path", "subclass", "organ", "cancer", "organ_id", "cancer_id"]
    row = manifest[manifest["subclass"] == "lung_scc"].iloc[0]
    assert (row["organ"], row["cancer"], row["organ_id"], row["cancer_id"]) == ("Lung", "Malignant", 6, 1)
    row = manifest[manifest["subclass"] == "all_benign"].iloc[0]
    assert (row["organ"], row["cancer"], row["organ_id"], row["cancer_id"]) == ("Blood", "Benign", 0, 0)


def test_scan_older_layout_and_single_type_folder(tmp_path):
    root = generate(tmp_path / "src", per_class=2, size=80)
    older = tmp_path / "older" / "Multi Cancer"
    shutil.copytree(root / DEMO_ROOT, older)  # Multi Cancer/<Type>/... without the doubled folder
    assert len(scan(tmp_path / "older")) == 52
    single = scan(older / "Lung and Colon Cancer")
    assert sorted(single["subclass"].unique()) == ["colon_aca", "colon_bnt", "lung_aca", "lung_bnt", "lung_scc"]
    assert set(single["organ"]) == {"Lung", "Colon"}


def test_scan_counts_ignored_files_and_missing_subclasses(bad_tree, caplog):
    result = scan_tree(bad_tree / DEMO_ROOT / "Lymphoma")
    assert result.report.ignored_files == 0
    assert "all_benign" in result.report.missing_subclasses and len(result.report.missing_subclasses) == 23
    assert "not found" in caplog.text
    assert scan_tree(bad_tree).report.ignored_files == 2  # notes.txt and the generator's SYNTHETIC.txt


def test_non_image_extensions_are_ignored_case_insensitively(tmp_path):
    folder = tmp_path / "Oral Cancer" / "oral_scc"
    folder.mkdir(parents=True)
    Image.new("RGB", (80, 80)).save(folder / "A.JPEG")
    Image.new("RGB", (80, 80)).save(folder / "b.Png")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / "Thumbs.db").write_bytes(b"\0")
    result = scan_tree(tmp_path)
    assert sorted(p.rsplit("/", 1)[1] for p in result.manifest["path"]) == ["A.JPEG", "b.Png"]
    assert result.report.ignored_files == 2


def test_unknown_folder_is_an_error_listing_it_or_skipped(tmp_path):
    generate(tmp_path, per_class=1, size=80)
    stray = tmp_path / DEMO_ROOT / "Liver Cancer" / "liver_hcc"
    stray.mkdir(parents=True)
    Image.new("RGB", (80, 80)).save(stray / "x.jpg")
    with pytest.raises(DataError, match=r"liver_hcc \(1 images\).*pass allow_unknown"):
        scan(tmp_path)
    assert len(scan(tmp_path, allow_unknown=True)) == 26


def test_no_images_names_the_root(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no images under {tmp_path / 'empty'}"):
        scan(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        scan(tmp_path / "missing")


def test_verify_drops_planted_bad_files_with_reasons(bad_tree):
    result = scan_tree(bad_tree, verify=True)
    reasons = {p.rsplit("/", 1)[1]: why for p, why in result.report.unreadable.items()}
    assert set(reasons) == {BAD_FILE_NAMES["empty"], BAD_FILE_NAMES["truncated"], BAD_FILE_NAMES["text"]}
    assert "empty" in reasons[BAD_FILE_NAMES["empty"]]
    assert "truncated" in reasons[BAD_FILE_NAMES["truncated"]]
    assert "not an image" in reasons[BAD_FILE_NAMES["text"]]
    kept = {p.rsplit("/", 1)[1] for p in result.manifest["path"]}
    assert BAD_FILE_NAMES["png_as_jpg"] in kept and len(result.manifest) == 26 * PER_CLASS + 1


def test_split_is_stratified_disjoint_complete_and_deterministic(demo_data):
    manifest = scan(demo_data)
    split = split_manifest(manifest, seed=7, method="random")
    assert len(split) == len(manifest) and set(split["path"]) == set(manifest["path"])
    assert split["path"].is_unique  # each file in exactly one split
    per_sub = pd.crosstab(split["subclass"], split["split"])
    assert (per_sub["train"] >= 8).all() and (per_sub["val"] >= 1).all() and (per_sub["test"] >= 1).all()
    fractions = split["split"].value_counts(normalize=True)
    assert abs(fractions["train"] - 0.70) < 0.03 and abs(fractions["test"] - 0.15) < 0.03
    again = split_manifest(manifest, seed=7, method="random")
    assert again["split"].tolist() == split["split"].tolist()
    other = split_manifest(manifest, seed=8, method="random")
    assert other["split"].tolist() != split["split"].tolist()


def test_tiny_subclasses_go_to_train(demo_data, caplog):
    manifest = scan(demo_data)
    tiny = pd.concat([manifest[manifest["subclass"] != "oral_scc"], manifest[manifest["subclass"] == "oral_scc"][:2]])
    split = split_manifest(tiny, method="random")
    assert set(split.loc[split["subclass"] == "oral_scc", "split"]) == {"train"}
    assert "fewer than 3" in caplog.text


def test_bad_fractions_are_rejected(demo_data):
    with pytest.raises(ConfigError, match="sum to 1"):
        split_manifest(scan(demo_data), fractions=(0.8, 0.3, 0.1))


def test_split_round_trips_and_missing_files_are_an_error(demo_data, tmp_path):
    split = split_manifest(scan(demo_data), method="random")
    path = save_split(split, tmp_path / "split.csv")
    loaded = load_split(path)
    pd.testing.assert_frame_equal(loaded[split.columns], split, check_dtype=False)
    split.loc[0, "path"] = str(tmp_path / "gone.jpg")
    save_split(split, tmp_path / "stale.csv")
    with pytest.raises(DataError, match=r"1 of \d+ listed images no longer exist \(first: .*gone.jpg\)"):
        load_split(tmp_path / "stale.csv")


def test_counts_table_has_totals(demo_data):
    table = counts_table(scan(demo_data))
    assert table.loc["Total", "Total"] == 26 * 12
    assert table.loc["Lymph", "Malignant"] == 36 and table.loc["Lymph", "Benign"] == 0


def test_dataset_yields_float_rgb_batches_with_dict_labels(demo_data):
    manifest = scan(demo_data).iloc[:10]
    ds = make_dataset(manifest, image_size=75, batch_size=4)
    images, labels = next(iter(ds))
    assert images.shape == (4, 75, 75, 3) and images.dtype.name == "float32"
    assert float(images.numpy().min()) >= 0.0 and float(images.numpy().max()) <= 255.0
    assert float(images.numpy().max()) > 1.0  # 0..255, not 0..1
    np.testing.assert_array_equal(labels["organ"].numpy(), manifest["organ_id"].to_numpy()[:4])
    assert sum(int(x.shape[0]) for x, _ in ds) == 10
    single = make_dataset(manifest, image_size=75, batch_size=4, task="cancer")
    np.testing.assert_array_equal(next(iter(single))[1].numpy(), manifest["cancer_id"].to_numpy()[:4])


def test_dataset_decodes_by_content_greyscale_to_rgb_and_skips_bad_files(tmp_path, demo_data):
    folder = tmp_path / "Brain Cancer" / "brain_glioma"
    folder.mkdir(parents=True)
    grey = np.tile(np.arange(100, dtype=np.uint8), (100, 1))
    Image.fromarray(grey, mode="L").save(folder / "grey_png_named.jpg", format="PNG")  # PNG content, .jpg name
    (folder / "broken.jpg").write_bytes(b"not an image")
    manifest = scan(tmp_path)
    assert len(manifest) == 2
    batches = list(make_dataset(manifest, image_size=80, batch_size=8))
    images = batches[0][0].numpy()
    assert images.shape == (1, 80, 80, 3)  # the broken file is skipped, not fatal
    np.testing.assert_allclose(images[0, ..., 0], images[0, ..., 2])  # grey replicated to 3 channels


def test_training_dataset_shuffles_and_eval_does_not(demo_data):
    manifest = scan(demo_data).iloc[::8]  # 39 files across all organs
    order = lambda ds: np.concatenate([y["organ"].numpy() for _, y in ds]).tolist()  # noqa: E731
    assert order(make_dataset(manifest, image_size=75, batch_size=64)) == manifest["organ_id"].tolist()
    shuffled = order(make_dataset(manifest, image_size=75, batch_size=64, training=True, seed=1))
    assert sorted(shuffled) == sorted(manifest["organ_id"]) and shuffled != manifest["organ_id"].tolist()


def test_scan_cli_prints_counts_and_writes_split(demo_data, tmp_path, capsys):
    out = tmp_path / "manifest.csv"
    assert cli.main(["scan", str(demo_data), "--out", str(out), "--split", "random"]) == 0
    printed = capsys.readouterr().out
    assert "312 images in 26 subclasses" in printed and "Total" in printed
    assert set(pd.read_csv(out)["split"]) == {"train", "val", "test"}


def test_scan_cli_verify_says_all_files_decode_or_names_the_dropped(tmp_path, capsys):
    data = generate(tmp_path / "clean", per_class=1, size=64, seed=0)
    assert cli.main(["scan", str(data), "--verify"]) == 0
    assert "--verify: all 26 files decode" in capsys.readouterr().out
    bad = generate(tmp_path / "bad", per_class=1, size=64, seed=0, with_bad_files=True)
    assert cli.main(["scan", str(bad), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "unreadable file(s)" in printed and "files decode" not in printed
    assert cli.main(["scan", str(data)]) == 0  # without --verify nothing was decoded: nothing to claim
    assert "decode" not in capsys.readouterr().out


def test_scan_cli_error_exits_2_with_one_line(tmp_path, capsys):
    assert cli.main(["scan", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_real_sample_scans_and_decodes(real_sample):
    result = scan_tree(real_sample, verify=True)
    files = [p for p in real_sample.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    assert len(result.manifest) == len(files) > 500  # every image, once; none unreadable
    assert set(result.manifest["subclass"]) == {p.parent.name for p in files}
    assert set(result.manifest["organ"]) >= {"Blood", "Brain", "Cervix", "Colon", "Kidney", "Lung"}
    assert not result.report.unreadable
    brain = result.manifest[result.manifest["organ"] == "Brain"].iloc[:2]
    lung = result.manifest[result.manifest["organ"] == "Lung"].iloc[:2]
    images, labels = next(iter(make_dataset(pd.concat([brain, lung]), image_size=96, batch_size=4)))
    assert images.shape == (4, 96, 96, 3)
    assert labels["organ"].numpy().tolist() == [1, 1, 6, 6]
