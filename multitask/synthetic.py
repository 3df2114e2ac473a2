"""A deterministic *synthetic* stand-in for the Kaggle "Multi Cancer" dataset, for demos and smoke tests only.

Nothing here is medical data. Each organ gets its own visual style (a blood smear, an MRI slice, histology,
cytology, a CT slice...), and within an organ the malignant subclasses differ from the benign ones by larger,
darker, more numerous and more irregular structures, with enough per-image randomness that the two overlap a
little: a model has to learn both tasks, and a model that learns nothing scores at chance.

Files are written in the exact Kaggle hierarchy: ``<out>/Multi Cancer/Multi Cancer/<Type>/<subclass>/
<subclass>_NNNN.jpg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from multitask.settings import SyntheticSettings
from multitask.taxonomy import Taxonomy, load_taxonomy

DEMO_ROOT = Path("Multi Cancer") / "Multi Cancer"
SYNTHETIC_MARK = "SYNTHETIC.txt"  # at the root of every generated dataset: reports and model cards say so
MIN_SYNTHETIC_SIZE = 8  # pixels: smaller images have no room for the structures that tell the classes apart


@dataclass(frozen=True)
class Style:
    """How one organ looks: background, structures ("blobs"), and whether it is greyscale."""

    background: tuple[float, float, float]
    blob_color: tuple[float, float, float]
    blob_count: int
    blob_radius: float  # fraction of the image size
    texture: float  # amplitude of low-frequency background texture
    grey: bool = False
    frame: bool = False  # an elliptical body outline (MRI / CT)
    holes: int = 0  # white gaps (alveoli, gland lumens)


STYLES: dict[str, Style] = {
    "Blood": Style((235, 200, 205), (120, 60, 150), 10, 0.06, 12),
    "Brain": Style((15, 15, 15), (200, 200, 200), 0, 0.10, 25, grey=True, frame=True),
    "Breast": Style((90, 90, 90), (30, 30, 30), 1, 0.16, 35, grey=True),
    "Cervix": Style((215, 225, 240), (60, 80, 170), 7, 0.05, 10),
    "Colon": Style((225, 150, 190), (110, 40, 120), 14, 0.035, 20, holes=5),
    "Kidney": Style((40, 40, 40), (150, 150, 150), 0, 0.09, 15, grey=True, frame=True),
    "Lung": Style((215, 170, 215), (100, 50, 140), 16, 0.03, 15, holes=9),
    "Lymph": Style((170, 120, 190), (60, 20, 100), 45, 0.025, 20),
    "Mouth": Style((240, 170, 160), (150, 60, 90), 12, 0.04, 18),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    grid = Image.fromarray(rng.uniform(0, 255, (cells, cells)).astype(np.uint8))
    return np.asarray(grid.resize((size, size), Image.BILINEAR), np.float32) / 127.5 - 1.0


def _paint(canvas: np.ndarray, cy: float, cx: float, radius: float, irregularity: float, rng,
           color) -> np.ndarray:
    """Blend a star-shaped blob (radius wobbling with angle by ``irregularity``) of ``color`` into ``canvas``."""
    wobble = [(rng.uniform(-1, 1), k, rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7)]
    r = radius * rng.uniform(0.8, 1.2)
    reach = int(r * (1 + irregularity * 1.5)) + 2  # only touch the blob's bounding box
    size = canvas.shape[0]
    y0, y1 = max(int(cy) - reach, 0), min(int(cy) + reach + 1, size)
    x0, x1 = max(int(cx) - reach, 0), min(int(cx) + reach + 1, size)
    if y0 >= y1 or x0 >= x1:
        return canvas
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    angle = np.arctan2(dy, dx)
    edge = r * (1.0 + irregularity * sum(a * np.cos(k * angle + p) for a, k, p in wobble) / 2.0)
    mask = np.clip(edge + 1.0 - np.sqrt(dy * dy + dx * dx), 0.0, 1.0)[..., None]
    window = canvas[y0:y1, x0:x1]
    canvas[y0:y1, x0:x1] = window * (1 - mask) + np.asarray(color, np.float32) * mask
    return canvas


def render(organ: str, malignant: bool, variant: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """One synthetic image (uint8 RGB, ``size`` x ``size``) of ``organ``; ``variant`` separates subclasses."""
    style = STYLES[organ]
    canvas = np.ones((size, size, 3), np.float32) * np.asarray(style.background, np.float32)
    canvas += rng.normal(0, 8, 3).astype(np.float32)  # per-image stain / exposure shift
    canvas += style.texture * _smooth_noise(rng, size, 6)[..., None]
    if style.frame:  # body outline: brighter tissue inside
        tissue = np.asarray(style.background) + 70 + 10 * variant
        canvas = _paint(canvas, size / 2, size / 2, size * 0.38, 0.1, rng, tissue)
    for _ in range(style.holes if not malignant else style.holes // 3):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        canvas = _paint(canvas, cy, cx, size * rng.uniform(0.05, 0.09), 0.3, rng, (245, 245, 245))

    # Malignancy: bigger, darker, more numerous and more irregular structures, with overlap between classes.
    scale = rng.uniform(1.35, 1.9) if malignant else rng.uniform(0.8, 1.2)
    count = style.blob_count or 1
    count = int(round(count * (rng.uniform(1.3, 1.8) if malignant else rng.uniform(0.7, 1.1))))
    irregularity = rng.uniform(0.35, 0.7) if malignant else rng.uniform(0.0, 0.25)
    darkness = rng.uniform(0.55, 0.8) if malignant else rng.uniform(0.85, 1.1)
    color = np.asarray(style.blob_color, np.float32) * darkness
    color = color + 12.0 * variant * np.asarray([1.0, -0.5, 0.5])  # subclass tint
    for _ in range(count):
        if style.blob_count == 0 and not malignant:
            break  # MRI / CT without a lesion
        cy, cx = rng.uniform(0.15, 0.85, 2) * size
        canvas = _paint(canvas, cy, cx, style.blob_radius * size * scale, irregularity, rng, color)
    canvas += rng.normal(0, 6, canvas.shape).astype(np.float32)  # sensor / stain grain
    if style.grey:
        canvas[...] = canvas.mean(axis=2, keepdims=True)
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _subclass_folders(root: Path, taxonomy: Taxonomy, table=None):
    """(index, row, folder, variant) per subclass of ``table`` (default: the whole taxonomy), folders created.

    ``variant`` numbers the subclasses of one organ (0, 1, ...): it tints each subclass differently.
    """
    for sub_index, row in (taxonomy.table if table is None else table).iterrows():
        folder = root / row["type_folder"] / row["subclass"]
        folder.mkdir(parents=True, exist_ok=True)
        same_organ = taxonomy.table[taxonomy.table["organ"] == row["organ"]]["subclass"].tolist()
        yield sub_index, row, folder, same_organ.index(row["subclass"])


def generate(
    out: str | os.PathLike,
    *,
    per_class: int = SyntheticSettings.per_class,
    size: int = SyntheticSettings.size,
    seed: int = SyntheticSettings.seed,
    with_bad_files: bool = False,
    taxonomy: Taxonomy | None = None,
) -> Path:
    """Write the synthetic dataset under ``out`` and return the folder to pass as ``--data``. ``out`` must be new,
    empty, or an earlier synthetic dataset (:data:`SYNTHETIC_MARK`): files of yours there are never replaced."""
    from multitask.errors import ConfigError
    from multitask.guard import check_output

    for name, value, low in (("size", size, MIN_SYNTHETIC_SIZE), ("per_class", per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"${name} must be a whole number of at least {low}, got {value!r}")
    taxonomy = taxonomy or load_taxonomy()
    out = Path(out)
    check_output(out, flag="$out", folder=True, mark=SYNTHETIC_MARK)
    root = out / DEMO_ROOT
    _mark_synthetic(out)
    for sub_index, row, folder, variant in _subclass_folders(root, taxonomy):
        for i in range(per_class):
            rng = np.random.default_rng([seed, sub_index, i])  # per-file stream: order-independent
            pixels = render(row["organ"], row["cancer"] == "Malignant", variant, rng, size)
            Image.fromarray(pixels).save(folder / f"{row['subclass']}_{i + 1:04d}.jpg", quality=90)
    if with_bad_files:
        plant_bad_files(root, taxonomy=taxonomy, size=size)
    return out


def _mark_synthetic(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / SYNTHETIC_MARK).write_text("Generated by multitask.synthetic: coloured shapes in the Kaggle folder layout, "
                                      "not medical images. Models trained on them say nothing about medicine.\n")


BAD_FILE_NAMES = {
    "empty": "zz_bad_empty.jpg",
    "truncated": "zz_bad_truncated.jpg",
    "text": "zz_bad_text.jpg",
    "png_as_jpg": "zz_png_named.jpg",
    "notes": "notes.txt",
}


def plant_bad_files(root: Path, *, taxonomy: Taxonomy, size: int) -> dict[str, Path]:
    """Add the files a real download may contain: empty, truncated, text-as-.jpg, PNG-as-.jpg, stray notes."""
    first = taxonomy.table.iloc[0]
    folder = root / first["type_folder"] / first["subclass"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / name for kind, name in BAD_FILE_NAMES.items()}
    paths["empty"].write_bytes(b"")
    good = render(first["organ"], first["cancer"] == "Malignant", 0, np.random.default_rng(99), size)
    Image.fromarray(good).save(paths["truncated"], format="JPEG", quality=90)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["text"].write_text("this is not an image\n")
    Image.fromarray(good).save(paths["png_as_jpg"], format="PNG")  # readable: must be kept
    paths["notes"].write_text("stray note; not an image, ignored by extension\n")
    return paths


# ----------------------------------------------------------------------------------------------- siblings
# The Kaggle set makes its 5,000 images per subclass by augmenting far fewer source images. These functions plant
# the same structure, with a known truth, so leakage-aware splitting can be tested.

MAX_ROTATION_DEG = 10.0
MAX_SHIFT = 0.10  # fraction of the side
MAX_ZOOM = 0.10
BRIGHTNESS = (0.8, 1.2)


def augment_like_kaggle(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A sibling of ``image`` (uint8, HxW or HxWxC): rotation <=10 deg, shift/zoom <=10%, flip, brightness 0.8-1.2."""
    import cv2

    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG),
                                     rng.uniform(1 - MAX_ZOOM, 1 + MAX_ZOOM))
    matrix[:, 2] += rng.uniform(-MAX_SHIFT, MAX_SHIFT, 2) * (width, height)
    # BORDER_REPLICATE is Keras ImageDataGenerator's default fill_mode="nearest".
    out = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.clip(out.astype(np.float32) * rng.uniform(*BRIGHTNESS), 0, 255).astype(np.uint8)


def _speckle(rng: np.random.Generator, size: int) -> np.ndarray:
    """Small sharp-edged light and dark dots (nuclei, vessels), about [-1, 1]: detail for local features to hold."""
    import cv2

    layer = np.zeros((size, size), np.float32)
    for _ in range(size * size // 120):
        cx, cy = (int(v) for v in rng.integers(0, size, 2))
        axes = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
        cv2.ellipse(layer, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, float(rng.choice([-1.0, 1.0])), -1)
    return layer


def render_source(organ: str, malignant: bool, variant: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """A :func:`render` image plus sharp speckle, so that every source is distinct at the keypoint level."""
    pixels = render(organ, malignant, variant, rng, size).astype(np.float32)
    pixels += 45.0 * _speckle(rng, size)[..., None]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def generate_with_siblings(
    out: str | os.PathLike,
    *,
    sources_per_class: int = 6,
    siblings_per_source: int = 4,
    size: int = 192,
    seed: int = 0,
    subclasses: list[str] | None = None,
    taxonomy: Taxonomy | None = None,
) -> dict[str, str]:
    """Write augmented siblings of a few sources per subclass (Kaggle layout); return path -> source id.

    Files are named ``<subclass>_NNNN.jpg`` in a shuffled order, as in the real set, so that nothing but the
    pixels tells which files share a source. Source ids look like ``lung_aca/s003``.
    """
    taxonomy = taxonomy or load_taxonomy()
    unknown = sorted(set(subclasses or ()) - set(taxonomy.subclasses))
    if unknown:
        raise ValueError(f"unknown subclass(es) {', '.join(unknown)}; expected names from the taxonomy")
    table = taxonomy.table if subclasses is None else taxonomy.table[taxonomy.table["subclass"].isin(subclasses)]
    root = Path(out) / DEMO_ROOT
    truth: dict[str, str] = {}
    for sub_index, row, folder, variant in _subclass_folders(root, taxonomy, table):
        order = np.random.default_rng([seed, sub_index, 1]).permutation(sources_per_class * siblings_per_source)
        for source in range(sources_per_class):
            rng = np.random.default_rng([seed, sub_index, 0, source])
            pixels = render_source(row["organ"], row["cancer"] == "Malignant", variant, rng, size)
            for sibling in range(siblings_per_source):
                number = order[source * siblings_per_source + sibling] + 1
                path = folder / f"{row['subclass']}_{number:04d}.jpg"
                Image.fromarray(augment_like_kaggle(pixels, rng)).save(path, quality=90)
                truth[os.path.abspath(path)] = f"{row['subclass']}/s{source:03d}"
    return truth
