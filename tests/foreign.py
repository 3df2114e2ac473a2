"""Foreign images, generated: everything a pathology/radiology model should refuse to answer about.

Used by tests/test_ood.py and scripts/measure_ood.py. Nothing is read from disk (no sample images of scikit-learn
or scikit-image: an independent check uses those). :func:`foreign_images` returns ``{name: RGB uint8 array}``;
the kind is the name's prefix (``scene``, ``document``, ``chart``, ``screen``, ``noise``, ``constant``,
``gradient``, ``texture``, ``nature`` (grass, gravel, clouds, wood), ``phantom`` (a CT-like slice: a modality
absent from training)), and every image is a pure function of its name, so the set is the same in every run.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256
KINDS = ("scene", "document", "chart", "screen", "noise", "constant", "gradient", "texture", "nature", "phantom")
WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "invoice", "total", "amount", "due", "date",
         "page", "report", "summary", "results", "method", "table", "figure", "patient", "meeting", "agenda", "notes",
         "project", "budget", "quarter", "revenue")


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng([ord(c) for c in name])


def _canvas(colour=(255, 255, 255)) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (SIZE, SIZE), colour)
    return image, ImageDraw.Draw(image)


def _text_lines(draw, rng, *, top: int, left: int, width: int, lines: int, colour=(20, 20, 20), step: int = 14):
    for i in range(lines):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        draw.text((left, top + i * step), words[: width // 6], fill=colour)


def scene(name: str) -> np.ndarray:
    """A rendered outdoor scene: sky gradient, sun, hills, houses with windows, trees."""
    rng = _rng(name)
    sky_top, sky_bottom = rng.integers(60, 140, 3), rng.integers(170, 255, 3)
    t = np.linspace(0, 1, SIZE)[:, None, None]
    array = (sky_top * (1 - t) + sky_bottom * t) * np.ones((1, SIZE, 1))
    image = Image.fromarray(array.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    cx, cy, r = int(rng.integers(30, 220)), int(rng.integers(20, 80)), int(rng.integers(12, 30))
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 230, 90))
    horizon = int(rng.integers(140, 190))
    ground = tuple(int(v) for v in rng.integers([30, 90, 20], [90, 170, 70]))
    hills = [(x, horizon - int(20 * np.sin(x / 30 + rng.random()))) for x in range(0, SIZE + 1, 16)]
    draw.polygon([(0, horizon), *hills, (SIZE, SIZE), (0, SIZE)], fill=ground)
    for _ in range(int(rng.integers(2, 5))):
        x, w, h = int(rng.integers(0, 200)), int(rng.integers(30, 60)), int(rng.integers(30, 70))
        base = horizon + int(rng.integers(5, 40))
        wall = tuple(int(v) for v in rng.integers(120, 250, 3))
        draw.rectangle((x, base - h, x + w, base), fill=wall, outline=(40, 40, 40))
        draw.polygon([(x - 5, base - h), (x + w // 2, base - h - 25), (x + w + 5, base - h)], fill=(150, 40, 30))
        draw.rectangle((x + 5, base - h + 8, x + 15, base - h + 18), fill=(200, 230, 255))
    for _ in range(int(rng.integers(2, 6))):
        x = int(rng.integers(0, SIZE))
        base = horizon + int(rng.integers(0, 50))
        draw.rectangle((x - 3, base - 30, x + 3, base), fill=(90, 60, 30))
        draw.ellipse((x - 16, base - 60, x + 16, base - 22), fill=(20, int(rng.integers(90, 160)), 30))
    return np.asarray(image.filter(ImageFilter.SMOOTH))


def document(name: str) -> np.ndarray:
    """A text page: a heading, paragraphs, sometimes a table."""
    rng = _rng(name)
    image, draw = _canvas((int(rng.integers(235, 256)),) * 3)
    draw.rectangle((16, 14, 16 + int(rng.integers(80, 200)), 26), fill=(30, 30, 30))
    _text_lines(draw, rng, top=36, left=16, width=224, lines=int(rng.integers(6, 14)))
    if rng.random() < 0.5:
        top = 140
        for row in range(6):
            for col in range(4):
                draw.rectangle((16 + col * 56, top + row * 16, 16 + (col + 1) * 56, top + (row + 1) * 16),
                               outline=(60, 60, 60))
                draw.text((20 + col * 56, top + 3 + row * 16), str(int(rng.integers(0, 999))), fill=(0, 0, 0))
    else:
        _text_lines(draw, rng, top=150, left=16, width=224, lines=6)
    return np.asarray(image)


def chart(name: str) -> np.ndarray:
    """A bar, line or pie chart with axes and labels."""
    rng = _rng(name)
    image, draw = _canvas()
    kind = ("bar", "line", "pie")[int(rng.integers(0, 3))]
    palette = [tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(6)]
    draw.text((60, 8), " ".join(rng.choice(WORDS, 3)), fill=(0, 0, 0))
    if kind == "pie":
        angles = np.cumsum(np.r_[0, rng.dirichlet(np.ones(5))]) * 360
        for i in range(5):
            draw.pieslice((48, 48, 208, 208), float(angles[i]), float(angles[i + 1]), fill=palette[i],
                          outline=(255, 255, 255))
        return np.asarray(image)
    draw.line((30, 220, 240, 220), fill=(0, 0, 0), width=2)
    draw.line((30, 30, 30, 220), fill=(0, 0, 0), width=2)
    for y in range(40, 220, 30):
        draw.line((30, y, 240, y), fill=(220, 220, 220))
        draw.text((4, y - 5), str(220 - y), fill=(0, 0, 0))
    values = rng.uniform(20, 180, 8)
    if kind == "bar":
        for i, v in enumerate(values):
            draw.rectangle((38 + i * 25, 220 - v, 56 + i * 25, 219), fill=palette[i % 6])
    else:
        for series in range(2):
            points = [(38 + i * 28, 220 - float(v)) for i, v in enumerate(rng.uniform(20, 180, 8))]
            draw.line(points, fill=palette[series], width=3)
    return np.asarray(image)


def screen(name: str) -> np.ndarray:
    """A screenshot-like user interface: title bar, sidebar, buttons, text fields."""
    rng = _rng(name)
    dark = rng.random() < 0.4
    image, draw = _canvas((40, 42, 48) if dark else (246, 246, 248))
    accent = tuple(int(v) for v in rng.integers(0, 256, 3))
    text = (220, 220, 220) if dark else (30, 30, 30)
    draw.rectangle((0, 0, SIZE, 22), fill=accent)
    draw.text((8, 5), " ".join(rng.choice(WORDS, 2)), fill=(255, 255, 255))
    draw.rectangle((0, 22, 60, SIZE), fill=(30, 30, 36) if dark else (228, 230, 235))
    for i in range(8):
        draw.text((6, 32 + i * 18), str(rng.choice(WORDS)), fill=text)
    for i in range(int(rng.integers(2, 5))):
        y = 40 + i * 40
        draw.rectangle((72, y, 240, y + 24), outline=(120, 120, 130), fill=(60, 62, 70) if dark else (255,) * 3)
        draw.text((78, y + 7), " ".join(rng.choice(WORDS, 3)), fill=text)
    draw.rounded_rectangle((150, 210, 240, 236), radius=6, fill=accent)
    draw.text((170, 218), "OK", fill=(255, 255, 255))
    return np.asarray(image)


def noise(name: str) -> np.ndarray:
    """Uniform, Gaussian, salt-and-pepper or coloured blob noise."""
    rng = _rng(name)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    if kind == 1:
        return np.clip(rng.normal(128, 50, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    if kind == 2:
        return np.where(rng.random((SIZE, SIZE, 1)) < 0.5, 0, 255).repeat(3, axis=2).astype(np.uint8)
    small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC))


def constant(name: str) -> np.ndarray:
    """A blank image: black, white, grey or one colour, sometimes with faint noise (a near-constant image)."""
    rng = _rng(name)
    colour = rng.integers(0, 256, 3) if rng.random() < 0.5 else np.full(3, rng.choice([0, 255, 128]))
    array = np.ones((SIZE, SIZE, 3)) * colour
    if rng.random() < 0.5:
        array = array + rng.normal(0, 2, array.shape)
    return np.clip(array, 0, 255).astype(np.uint8)


def gradient(name: str) -> np.ndarray:
    """A linear or radial colour gradient."""
    rng = _rng(name)
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = (np.cos(angle) * x + np.sin(angle) * y) / (abs(np.cos(angle)) + abs(np.sin(angle)))
        t = t - t.min()
    else:
        t = np.clip(np.hypot(x - rng.random(), y - rng.random()), 0, 1)
    return (a * (1 - t[..., None]) + b * t[..., None]).astype(np.uint8)


def texture(name: str) -> np.ndarray:
    """A checkerboard, stripes, a starfield or a brick wall."""
    rng = _rng(name)
    kind = int(rng.integers(0, 4))
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if kind == 0:
        cell = int(rng.integers(8, 40))
        mask = ((x // cell + y // cell) % 2).astype(bool)
        return np.where(mask[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
    if kind == 1:
        period, angle = rng.uniform(6, 30), rng.uniform(0, np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * x + np.sin(angle) * y) / period)
        return (wave[..., None] * rng.integers(100, 256, 3)).astype(np.uint8)
    if kind == 2:
        array = np.zeros((SIZE, SIZE, 3))
        stars = rng.integers(0, SIZE, (int(rng.integers(80, 300)), 2))
        array[stars[:, 0], stars[:, 1]] = rng.uniform(150, 255, (len(stars), 1))
        return np.asarray(Image.fromarray(array.astype(np.uint8)).filter(ImageFilter.MaxFilter(3)))
    image, draw = _canvas((200, 200, 200))
    brick = tuple(int(v) for v in rng.integers([140, 40, 20], [200, 90, 60]))
    for row in range(0, SIZE, 20):
        shift = 20 if (row // 20) % 2 else 0
        for col in range(-40, SIZE, 40):
            draw.rectangle((col + shift, row, col + shift + 37, row + 17), fill=brick)
    return np.asarray(image)


def _fractal(rng, shape=(SIZE, SIZE), octaves: int = 6) -> np.ndarray:
    """Value noise summed over octaves, in [0, 1]: clouds, stone, bark."""
    total = np.zeros(shape)
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        small = rng.random((cells, cells))
        layer = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize(shape[::-1], Image.BICUBIC))
        total += layer / 255 / 2 ** octave
    return (total - total.min()) / (np.ptp(total) + 1e-9)


def nature(name: str) -> np.ndarray:
    """Natural textures: grass blades, gravel, clouds, wood grain."""
    rng = _rng(name)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        image, draw = _canvas((40, 80, 30))
        for _ in range(1500):
            x, y = int(rng.integers(0, SIZE)), int(rng.integers(0, SIZE + 20))
            lean, height = int(rng.integers(-6, 7)), int(rng.integers(10, 30))
            green = (int(rng.integers(30, 110)), int(rng.integers(110, 200)), int(rng.integers(20, 70)))
            draw.line((x, y, x + lean, y - height), fill=green, width=int(rng.integers(1, 3)))
        return np.asarray(image)
    if kind == 1:
        image, draw = _canvas((110, 105, 100))
        for _ in range(900):
            x, y, r = int(rng.integers(0, SIZE)), int(rng.integers(0, SIZE)), int(rng.integers(3, 10))
            grey = int(rng.integers(60, 220))
            tint = rng.integers(-15, 16, 3)
            draw.ellipse((x - r, y - int(r * rng.uniform(0.6, 1)), x + r, y + r),
                         fill=tuple(int(np.clip(grey + t, 0, 255)) for t in tint), outline=(50, 50, 50))
        return np.asarray(image.filter(ImageFilter.SMOOTH))
    if kind == 2:
        cloud = _fractal(rng)[..., None]
        sky = np.array([70, 130, 210])
        return (sky * (1 - cloud) + 255 * cloud).astype(np.uint8)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rings = np.sin((np.hypot(x - rng.uniform(-200, 0), y - rng.uniform(0, SIZE)) + 30 * _fractal(rng)) / 4)
    wood = 0.5 + 0.5 * rings[..., None]
    return (np.array([150, 95, 50]) * (0.6 + 0.4 * wood)).astype(np.uint8)


def phantom(name: str) -> np.ndarray:
    """A CT-like slice drawn from ellipses (in the manner of the Shepp-Logan phantom), grey on black."""
    rng = _rng(name)
    image = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(image)
    cx, cy = SIZE // 2 + int(rng.integers(-10, 11)), SIZE // 2 + int(rng.integers(-10, 11))
    ax, ay = int(rng.integers(80, 110)), int(rng.integers(95, 120))
    draw.ellipse((cx - ax, cy - ay, cx + ax, cy + ay), fill=230)
    draw.ellipse((cx - ax + 8, cy - ay + 10, cx + ax - 8, cy + ay - 8), fill=int(rng.integers(60, 110)))
    for _ in range(int(rng.integers(3, 8))):
        ex, ey = cx + int(rng.integers(-50, 51)), cy + int(rng.integers(-60, 61))
        rx, ry = int(rng.integers(6, 35)), int(rng.integers(6, 45))
        draw.ellipse((ex - rx, ey - ry, ex + rx, ey + ry), fill=int(rng.integers(20, 200)))
    array = np.asarray(image.filter(ImageFilter.GaussianBlur(1)), np.float64) + rng.normal(0, 3, (SIZE, SIZE))
    return np.clip(array, 0, 255).astype(np.uint8)[..., None].repeat(3, axis=2)


MAKERS = {"scene": scene, "document": document, "chart": chart, "screen": screen, "noise": noise,
          "constant": constant, "gradient": gradient, "texture": texture, "nature": nature, "phantom": phantom}


def foreign_images(per_kind: int = 5) -> dict[str, np.ndarray]:
    """``per_kind`` images of every kind, ``{"scene_0": array, ...}``: RGB uint8, SIZE x SIZE."""
    return {f"{kind}_{i}": MAKERS[kind](f"{kind}_{i}") for kind in KINDS for i in range(per_kind)}


def kind_of(name: str) -> str:
    return name.rsplit("_", 1)[0]
