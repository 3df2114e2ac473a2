"""The decoded-image cache: what it holds, when it is reused, rebuilt or not used, and the batches read from it."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from conftest import IMAGE_SIZE

from multitask.data import load_image
from multitask.decoded import (
    decoded_bytes,
    decoded_dataset,
    decoded_images,
    read_batches,
    wants_decoded_cache,
)
from multitask.features import cached_features, extract_features
from multitask.synthetic import plant_bad_files
from multitask.taxonomy import load_taxonomy


@pytest.fixture
def paths(demo_data, tmp_path):
    """Five demo images with an undecodable text file in the middle, copied so a test may edit them."""
    import shutil

    good = sorted(demo_data.rglob("*.jpg"))[:5]
    copies = []
    for i, path in enumerate(good):
        copies.append(tmp_path / "images" / f"{i}.jpg")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy2(path, copies[-1])
    bad = plant_bad_files(tmp_path / "bad", taxonomy=load_taxonomy(), size=96)["text"]
    return [str(p) for p in copies[:2]] + [str(bad)] + [str(p) for p in copies[2:]]


def test_holds_the_decoders_pixels_rounded_and_is_reused(paths, tmp_path):
    first = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=tmp_path / "cache", verbose=0)
    assert not first.reused and first.rows.tolist() == [0, 1, 3, 4, 5]
    assert first.images.shape == (6, IMAGE_SIZE, IMAGE_SIZE, 3) and first.images.dtype == np.uint8
    assert isinstance(first.images, np.memmap) and first.path.stat().st_size >= decoded_bytes(6, IMAGE_SIZE)
    for row in first.rows:
        expected = np.asarray(load_image(paths[row], IMAGE_SIZE))
        assert np.abs(first.images[row].astype(np.float32) - expected).max() <= 0.5 + 1e-4
    assert not first.images[2].any()  # the text file: no pixels, and not among the rows
    mtime = first.path.stat().st_mtime_ns
    again = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=tmp_path / "cache", verbose=0)
    assert again.reused and again.path == first.path and again.path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.rows, first.rows)


def test_a_stale_cache_is_never_used(paths, tmp_path):
    cache = tmp_path / "cache"
    first = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=cache, verbose=0)
    assert not decoded_images(paths, image_size=IMAGE_SIZE + 5, cache_dir=cache, verbose=0).reused
    os.utime(paths[0], ns=(0, os.stat(paths[0]).st_mtime_ns + 10**9))  # an edited file
    edited = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=cache, verbose=0)
    assert not edited.reused and edited.path != first.path
    assert not decoded_images(paths[:-1], image_size=IMAGE_SIZE, cache_dir=cache, verbose=0).reused


@pytest.mark.parametrize("damage", ["flip_a_pixel", "truncate", "sidecar_garbage", "sidecar_missing", "other_shape"])
def test_a_damaged_cache_is_rebuilt_not_trusted(paths, tmp_path, caplog, damage):
    cache = tmp_path / "cache"
    first = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=cache, verbose=0)
    good = np.array(first.images)
    sidecar = first.path.with_suffix(".json")
    del first
    if damage == "flip_a_pixel":
        with open(sidecar.with_suffix(".npy"), "r+b") as fh:
            fh.seek(-1000, os.SEEK_END)
            byte = fh.read(1)
            fh.seek(-1000, os.SEEK_END)
            fh.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate":
        os.truncate(sidecar.with_suffix(".npy"), sidecar.with_suffix(".npy").stat().st_size // 2)
    elif damage == "sidecar_garbage":
        sidecar.write_text("{not json")
    elif damage == "sidecar_missing":
        sidecar.unlink()
    else:
        np.save(sidecar.with_suffix(".npy"), np.zeros((6, 8, 8, 3), np.uint8))
    with caplog.at_level(logging.WARNING, logger="multitask.decoded"):
        rebuilt = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=cache, verbose=0)
    assert not rebuilt.reused
    np.testing.assert_array_equal(rebuilt.images, good)
    if damage not in ("sidecar_missing",):
        assert "damaged decoded-image cache" in caplog.text
    assert decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=cache, verbose=0).reused  # whole again


def test_decoded_cache_auto_uses_it_only_when_it_fits_the_disk_budget(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    fits = max(1, int(0.1 * free / decoded_bytes(1, 256)))
    too_many = int(0.6 * free / decoded_bytes(1, 256)) + 1
    options = dict(image_size=256, cache_dir=tmp_path / "not-yet", disk_share=0.5)
    assert wants_decoded_cache("auto", count=fits, **options)
    assert not wants_decoded_cache("auto", count=too_many, **options)
    assert not wants_decoded_cache("off", count=1, **options)
    assert wants_decoded_cache("on", count=fits, **options)
    with pytest.raises(OSError, match="decoded-image cache"):
        wants_decoded_cache("on", count=int(free / decoded_bytes(1, 256)) + 10, **options)
    assert not wants_decoded_cache("auto", count=1, distributed=True, **options)
    assert decoded_bytes(1, 256) == 196_608  # the "about 196 KB per 256 px image"


def test_batches_and_datasets_keep_images_with_their_labels(paths, tmp_path):
    decoded = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=tmp_path, verbose=0)
    positions = np.array([5, 0, 3, 4, 1])
    batches = list(read_batches(decoded.images, positions, batch_size=2, workers=2, ahead=1))
    assert [b[0].tolist() for b in batches] == [[5, 0], [3, 4], [1]]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), decoded.images[positions])
    # Labels that name their own row: after shuffling and batching, every image must still sit with its label.
    ds = decoded_dataset(decoded, positions, {"organ": positions.astype(np.int32)}, batch_size=2, training=True,
                         seed=1)
    seen = []
    for images, labels in ds:
        assert images.dtype.name == "uint8"
        for image, row in zip(images.numpy(), labels["organ"].numpy(), strict=True):
            np.testing.assert_array_equal(image, decoded.images[row])
            seen.append(int(row))
    assert sorted(seen) == sorted(positions.tolist())
    flipped = decoded_dataset(decoded, positions, positions, batch_size=5, training=True, seed=1,
                              augment=lambda x: 255.0 - x)
    images, rows = next(iter(flipped))
    assert images.dtype.name == "float32"
    np.testing.assert_allclose(images.numpy(), 255.0 - decoded.images[rows.numpy()].astype(np.float32))


def test_features_from_the_cache_match_the_files_and_share_one_cache(paths, tmp_path):
    import keras

    keras.utils.set_random_seed(0)  # a stand-in for InceptionV3: pooled colours through a dense layer
    image = keras.Input((None, None, 3))
    backbone = keras.Model(image, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(image)))
    decoded = decoded_images(paths, image_size=IMAGE_SIZE, cache_dir=tmp_path, verbose=0)
    from_files, rows = extract_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=4, verbose=0)
    from_cache, cached_rows = extract_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=4, verbose=0,
                                               decoded=decoded)
    np.testing.assert_array_equal(rows, cached_rows)
    # The decoder rounds pixels to whole numbers, so the cache holds exactly what the files give: same features.
    np.testing.assert_allclose(from_cache, from_files, rtol=1e-6, atol=1e-6)
    b = cached_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=4, cache_dir=tmp_path, verbose=0,
                        decoded=decoded)
    a = cached_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=4, cache_dir=tmp_path, verbose=0)
    assert not b.reused and a.reused and a.path == b.path  # one key, whichever way the pixels were read
    # Given as a callable (as train does), the cache is opened only when features must be computed.
    again = cached_features(backbone, paths, image_size=IMAGE_SIZE, batch_size=4, cache_dir=tmp_path, verbose=0,
                            decoded=lambda: pytest.fail("opened the decoded cache for features that were cached"))
    assert again.reused and again.path == b.path
    opened = []
    fresh = cached_features(backbone, paths, image_size=IMAGE_SIZE + 1, batch_size=4, cache_dir=tmp_path, verbose=0,
                            decoded=lambda: opened.append(1) or decoded_images(paths, image_size=IMAGE_SIZE + 1,
                                                                               cache_dir=tmp_path, verbose=0))
    assert opened == [1] and not fresh.reused
