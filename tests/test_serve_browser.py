"""multitask serve's page in a real headless Chromium: the cards, what they say, and what the page explains.

Drives Debian's /usr/bin/chromium through Playwright (no browser download); `.ci/run` installs the package where
it is missing. Skips, saying why, only where Playwright or that browser is absent. Each test saves its screenshots
under its tmp_path (printed with -s).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="multitask serve needs the serve extra: pip install 'multitask[serve]'")
pytest.importorskip("uvicorn", reason="multitask serve needs the serve extra: pip install 'multitask[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000  # every wait is bounded; generous because the machine may be shared and busy
FILE_LIMIT = 256 * 1024  # the server's per-file limit here: big.png is over it, the demo images far below
TOKEN = "browser-test-token-0123456789"

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no browser at {CHROMIUM}: apt-get install -y chromium")


@pytest.fixture(scope="module")
def unseen_run(joint_run, tmp_path_factory) -> Path:
    """A copy of joint_run whose split has no Mouth image in train (the organs-never-seen list must name it) and
    whose config gives Brain its own malignancy threshold (the operating-point text must list it)."""
    import pandas as pd

    run = shutil.copytree(joint_run, tmp_path_factory.mktemp("unseen") / "run")
    split = pd.read_csv(run / "split.csv")
    split.loc[split["subclass"].str.startswith("oral_") & (split["split"] == "train"), "split"] = "val"
    split.to_csv(run / "split.csv", index=False)
    config = json.loads((run / "config.json").read_text())
    config["calibration"]["malignancy_thresholds"] = {
        "Brain": {"threshold": 0.3, "source": "organ", "n_malignant": 12, "n_benign": 10},
        "Lung": {"threshold": config["calibration"]["malignancy_threshold"], "source": "global"}}
    (run / "config.json").write_text(json.dumps(config))
    return run


@pytest.fixture(scope="module")
def uploads(demo_data, joint_predictor, tmp_path_factory) -> dict[str, Path]:
    """The files of the main test: the demo images the organ head is least and most sure of, a file over the
    limit, a text file, a text file named .jpg, and a foreign image (tests/foreign.py's scene) for the detector."""
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from foreign import scene

    folder = tmp_path_factory.mktemp("uploads")
    files = sorted(demo_data.rglob("*_0001.jpg"))
    organ_prob = joint_predictor.predict_files([str(f) for f in files])["organ_prob"].to_numpy()
    low, high = files[int(np.argmin(organ_prob))], files[int(np.argmax(organ_prob))]
    assert organ_prob.max() - organ_prob.min() > 0.05, organ_prob  # a low and a high answer to tell apart
    big = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), np.uint8)).save(big, format="PNG")
    (folder / "big.png").write_bytes(big.getvalue())
    assert (folder / "big.png").stat().st_size > FILE_LIMIT
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "fake.jpg").write_text("a text file with an image's name\n")
    Image.fromarray(scene("scene_0")).save(folder / "scene_0.png")
    return {"low": low, "big": folder / "big.png", "notes": folder / "notes.txt", "high": high,
            "fake": folder / "fake.jpg", "foreign": folder / "scene_0.png",
            "level": float(organ_prob.min() + organ_prob.max()) / 2}


@pytest.fixture(scope="module")
def server(unseen_run, joint_predictor, uploads):
    from multitask.serve.app import create_app, running

    app = create_app(unseen_run, predictor=joint_predictor, max_upload_bytes=FILE_LIMIT,
                     low_confidence=uploads["level"])
    with running(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"],
                                             timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1000, "height": 800})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_function("document.querySelector('#model').textContent.includes('75 px')")
    return page


def api(server: str, files: list[Path]) -> list[dict]:
    import httpx

    return httpx.post(f"{server}/predict", timeout=TIMEOUT_MS / 1000,
                      files=[("files", (f.name, f.read_bytes(), "application/octet-stream")) for f in files]
                      ).json()["results"]


def test_a_mixed_upload_shows_each_file_truthfully_in_upload_order(server, browser, uploads, unseen_run, tmp_path):
    """Issue 20 items 16-21 (and 12's page part) on one upload of six files."""
    order = [uploads[k] for k in ("low", "big", "notes", "high", "fake", "foreign")]
    answers = {r["file"]: r for r in api(server, order)}
    low, high, foreign = (answers[uploads[k].name] for k in ("low", "high", "foreign"))
    assert foreign["ood"] is True and low["ood"] is False and high["ood"] is False  # the scene is flagged
    page = open_page(browser, f"{server}/")
    page.set_input_files("#files", [str(f) for f in order])
    page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 6")
    page.screenshot(path=str(tmp_path / "mixed-upload.png"), full_page=True)
    print(f"\nscreenshots in {tmp_path}")
    card = {key: page.locator(f'.card[data-file="{uploads[key].name}"]') for key in
            ("low", "big", "notes", "high", "fake", "foreign")}

    # 21: upload order; a non-image file gets an error card with no broken image (no <img> that failed to load)
    assert page.eval_on_selector_all(".card", "cards => cards.map(c => c.dataset.file)") == [f.name for f in order]
    assert page.evaluate("[...document.images].every(i => i.complete && i.naturalWidth > 0)")
    for key in ("notes", "fake"):
        assert card[key].locator("img").count() == 0 and card[key].locator("div.thumb").is_visible()
        assert card[key].locator(".error").inner_text().startswith("Cannot analyse: not an image")

    # 16: the oversized file fails alone; every other card has its answer
    assert "larger than the limit of 256 KB per file" in card["big"].locator(".error").inner_text()
    assert card["big"].locator("img.thumb").evaluate("i => i.naturalWidth") > 0  # its preview stays: it is an image
    for key in ("low", "high"):
        assert card[key].locator(".error").count() == 0 and card[key].locator("b.organ").is_visible()

    # 17: the status counts what was analysed and what could not be read
    assert page.inner_text("#status") == "3 image(s) analysed, 3 could not be read"

    # 18: the flagged image leads with the refusal; its answers are collapsed, then greyed when opened
    body = card["foreign"].locator(".body > *")
    assert body.first.inner_text().startswith("Not like the images this model was trained on")
    assert not card["foreign"].locator("b.cancer").is_visible() and not card["foreign"].locator("b.organ").is_visible()
    card["foreign"].locator("summary").click()
    assert card["foreign"].locator("b.organ").inner_text() == foreign["organ"]
    assert float(card["foreign"].locator(".answers").evaluate("e => getComputedStyle(e).opacity")) < 1
    assert card["low"].locator(".refusal").count() == card["high"].locator(".refusal").count() == 0

    # 19: the organ answer below the confidence level is marked, with its runner-up; the sure one is not marked
    for key, result in (("low", low), ("high", high)):
        ranked = sorted(result["organ_probabilities"].items(), key=lambda item: -item[1])
        runner_up = card[key].locator(".runner-up").inner_text()
        assert runner_up == f"runner-up: {ranked[1][0]} {100 * ranked[1][1]:.1f}%"
    assert card["low"].locator(".answer.uncertain .tag").inner_text() == "uncertain"
    assert card["high"].locator(".uncertain").count() == 0

    # 12 (the page's part): P(Malignant) and the threshold that decided
    for key, result in (("low", low), ("high", high)):
        assert f"P(Malignant) {100 * result['malignant_prob']:.1f}%" in card[key].locator(".answer").nth(1).inner_text()
        assert (f"Malignant from {100 * result['malignancy_threshold']:.1f}%"
                in card[key].locator(".threshold").inner_text())

    # 20: disclaimer, the operating point explained from the run's config, the Grad-CAM scale, the unseen organs
    assert page.locator("#disclaimer").inner_text().startswith("For research use only.")
    calibration = json.loads((unseen_run / "config.json").read_text())["calibration"]
    about = page.inner_text("#about-threshold")
    assert f"Malignant from {100 * calibration['malignancy_threshold']:.1f}%" in about
    assert f"at least {100 * calibration['target_sensitivity']:.1f}% of malignant images" in about
    assert f"found {100 * calibration['validation']['sensitivity']:.1f}%" in about
    assert f"({calibration['validation']['images']} images)" in about
    assert "have their own: Brain 30.0%." in about  # Lung falls back to the global one: not listed
    assert "never saw in training: Mouth." in page.inner_text("#about-organs")
    scale = page.locator(".scale i")
    assert scale.is_visible() and "linear-gradient" in scale.evaluate("e => getComputedStyle(e).backgroundImage")
    assert "low" in page.inner_text(".scale") and "high" in page.inner_text(".scale")
    page.screenshot(path=str(tmp_path / "mixed-upload-opened.png"), full_page=True)
    page.close()


def test_two_uploads_show_the_apis_answers_and_their_grad_cams(server, browser, demo_data, tmp_path):
    files = sorted(demo_data.rglob("*.jpg"))
    images = [next(f for f in files if f.parent.name == subclass) for subclass in ("colon_aca", "kidney_normal")]
    answers = api(server, images)

    page = open_page(browser, f"{server}/")
    page.set_input_files("#files", [str(f) for f in images])
    page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 2")
    for answer in answers:
        card = page.locator(f'.card[data-file="{answer["file"]}"]')
        assert card.locator("b.organ").inner_text() == answer["organ"]
        assert card.locator("b.cancer").inner_text() == answer["cancer"]
        assert f"{100 * answer['malignancy_threshold']:.1f}%" in card.locator(".threshold").inner_text()
        assert card.locator(".refusal").count() == int(answer.get("ood", False))
    assert page.locator("img.cam").count() == 0

    page.check("#show-cams")
    page.wait_for_function("[...document.querySelectorAll('img.cam')].filter(i => i.complete && i.naturalWidth > 0 "
                           "&& i.offsetParent !== null).length === 4")
    for answer in answers:
        heads = page.locator(f'.card[data-file="{answer["file"]}"] img.cam')
        assert sorted(heads.nth(i).get_attribute("data-head") for i in range(2)) == ["cancer", "organ"]
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.uncheck("#show-cams")
    assert not page.locator("img.cam").first.is_visible()
    page.close()


def test_the_page_asks_for_the_token_once_and_then_works(joint_run, joint_predictor, browser, demo_data, tmp_path):
    from multitask.serve.app import create_app, running

    image = sorted(demo_data.rglob("*.jpg"))[0]
    with running(create_app(joint_run, predictor=joint_predictor, token=TOKEN)) as url:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{url}/")
        page.wait_for_selector("#token-form.needed")
        assert "the server does not answer" in page.inner_text("#model")
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_function("document.querySelector('#model').textContent.includes('75 px')")
        assert not page.locator("#token-form").is_visible()
        page.set_input_files("#files", [str(image)])
        page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 1")
        assert page.locator(".card b.organ").is_visible()
        page.screenshot(path=str(tmp_path / "token.png"), full_page=True)

        linked = browser.new_page()  # the address multitask serve prints can carry it: #token=..., never sent
        linked.set_default_timeout(TIMEOUT_MS)
        linked.goto(f"{url}/#token={TOKEN}")
        linked.wait_for_function("document.querySelector('#model').textContent.includes('75 px')")
        assert "token" not in linked.url  # removed from the address bar once read
        page.close()
        linked.close()
