"""The README's picture of `multitask serve`'s page (docs/serve.png): a run's page with a few uploads.

Serves a run on a free localhost port, uploads images in headless Chromium (Debian's ``/usr/bin/chromium`` through
Playwright), turns the Grad-CAM overlays on and saves the screenshot. Two ways::

    python scripts/screenshot_serve.py --run RUN --images A.jpg B.png [--foreign scene_0] [--out docs/serve.png]
    python scripts/screenshot_serve.py [--data DIR] [--run DIR] [--out docs/serve.png]

With ``--images``, those files of an existing run are uploaded, in order, then ``--foreign NAME``: an image from
``tests/foreign.py``'s generator (``scene_0``, ``document_1``...: something the model should refuse), made in
memory and written to a temporary file. docs/serve.png is made this way from the shared real sample::

    multitask train --data ../shared/data/real-sample --weights "$(../shared/tools/pretrained-weights)" \\
        --image-size 160 --out /tmp/serve-real-run
    python scripts/screenshot_serve.py --run /tmp/serve-real-run --foreign scene_0 --images \\
        "$(grep -m1 ',test,' /tmp/serve-real-run/split.csv | ...)"   # see the README for the exact files

Without ``--images``, it makes (or reuses) a synthetic run: ``multitask demo-data DATA --per-class 10 --size 128``
then ``multitask train --data DATA --out RUN --weights none --image-size 128 --epochs 10 --learning-rate 3e-3
--split random``, and uploads its first Brain and Lung test images; it refuses data without the synthetic
generator's mark there, so that mode never shows a real image by accident.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from multitask.synthetic import SYNTHETIC_MARK  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ORGANS = ("Brain", "Lung")  # the two cards shown


def make_run(data: Path, run: Path) -> None:
    from multitask import cli

    if not data.exists():
        cli.main(["demo-data", str(data), "--per-class", "10", "--size", "128"])
    if not (data / SYNTHETIC_MARK).is_file():
        sys.exit(f"{data} is not a synthetic dataset (no {SYNTHETIC_MARK}): the README shows synthetic images only")
    if not (run / "config.json").exists():
        cli.main(["train", "--data", str(data), "--out", str(run), "--weights", "none", "--image-size", "128",
                  "--epochs", "10", "--learning-rate", "3e-3", "--split", "random"])


def pick_images(run: Path, data: Path) -> list[str]:
    """The first test image of each organ in ORGANS; they must come from the synthetic ``data``."""
    from multitask.rundir import open_run
    from multitask.splits import load_split

    info = open_run(run)
    test = load_split(info.split_path, taxonomy=info.taxonomy).query("split == 'test'")
    images = [test[test["organ"] == organ]["path"].iloc[0] for organ in ORGANS]
    if not all(Path(image).resolve().is_relative_to(data.resolve()) for image in images):
        sys.exit(f"{run} was not trained on {data}: pass the synthetic data it was trained on as --data")
    return images


def foreign_image(name: str, folder: Path) -> str:
    """``tests/foreign.py``'s image ``name`` (e.g. ``scene_0``) as a PNG in ``folder``."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from foreign import MAKERS, kind_of

    if kind_of(name) not in MAKERS:
        sys.exit(f"--foreign {name}: the name is KIND_N with KIND one of {', '.join(MAKERS)}, e.g. scene_0")
    path = folder / f"{name}.png"
    Image.fromarray(MAKERS[kind_of(name)](name)).save(path)
    return str(path)


def screenshot(url: str, images: list[str], out: Path) -> None:
    from playwright.sync_api import sync_playwright

    from multitask.files import atomic_path

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], timeout=60_000)
        page = browser.new_page(viewport={"width": 980, "height": 560}, device_scale_factor=1)
        page.set_default_timeout(120_000)
        page.goto(f"{url}/")
        page.wait_for_function("document.querySelector('#model').textContent.includes(' px')")
        page.set_input_files("#files", images)
        page.wait_for_function(f"document.querySelectorAll('.card[data-state=done]').length === {len(images)}")
        page.check("#show-cams")
        page.wait_for_function("[...document.querySelectorAll('img.cam')].filter(i => i.complete && "
                               f"i.naturalWidth > 0).length === {2 * len(images)}")
        with atomic_path(out) as tmp:  # never a half-written PNG
            page.screenshot(path=str(tmp), type="png", full_page=True)
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/serve.png")
    parser.add_argument("--data", default="artifacts/screenshot/data", help="synthetic data (made when missing)")
    parser.add_argument("--run", default="artifacts/screenshot/run",
                        help="the run to serve (without --images: a synthetic one, trained when missing)")
    parser.add_argument("--images", nargs="+", help="image files to upload, in order (the run must exist)")
    parser.add_argument("--foreign", metavar="NAME", help="also upload tests/foreign.py's image NAME, e.g. scene_0")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    import tempfile

    from multitask.serve.app import create_app, running

    data, run = Path(args.data), Path(args.run)
    if args.images:
        if not (run / "config.json").is_file():
            sys.exit(f"--run {run} is not a finished run (no config.json): train it first")
        images = [str(Path(image).resolve()) for image in args.images]
    else:
        make_run(data, run)
        images = pick_images(run, data)
    with tempfile.TemporaryDirectory() as folder, running(create_app(run)) as url:
        if args.foreign:
            images.append(foreign_image(args.foreign, Path(folder)))
        screenshot(url, images, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
