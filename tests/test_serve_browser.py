"""multitask serve's page in a real headless Chromium: upload two images, read the cards, show the Grad-CAMs.

Drives Debian's /usr/bin/chromium through Playwright (no browser download); `.ci/run` installs the package where
it is missing. Skips, saying why, only where Playwright or that browser is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="multitask serve needs the serve extra: pip install 'multitask[serve]'")
pytest.importorskip("uvicorn", reason="multitask serve needs the serve extra: pip install 'multitask[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the dev extra)")

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 60_000  # every wait is bounded; generous because the machine may be shared and busy

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no browser at {CHROMIUM}: apt-get install -y chromium")


@pytest.fixture(scope="module")
def server(joint_run, joint_predictor):
    from multitask.serve.app import create_app, running

    with running(create_app(joint_run, predictor=joint_predictor)) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"],
                                             timeout=TIMEOUT_MS)
        yield browser
        browser.close()


def test_two_uploads_show_the_apis_answers_and_their_grad_cams(server, browser, demo_data, tmp_path):
    import httpx

    files = sorted(demo_data.rglob("*.jpg"))
    images = [next(f for f in files if f.parent.name == subclass) for subclass in ("colon_aca", "kidney_normal")]
    api = httpx.post(f"{server}/predict", timeout=TIMEOUT_MS / 1000,
                     files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in images]).json()["results"]

    page = browser.new_page(viewport={"width": 1000, "height": 700})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server}/")
    page.wait_for_function("document.querySelector('#model').textContent.includes('75 px')")
    page.set_input_files("#files", [str(f) for f in images])
    page.wait_for_function("document.querySelectorAll('.card[data-state=done]').length === 2")
    for answer in api:
        card = page.locator(f'.card[data-file="{answer["file"]}"]')
        assert card.locator("b.organ").inner_text() == answer["organ"]
        assert card.locator("b.cancer").inner_text() == answer["cancer"]
        assert f"{100 * answer['malignancy_threshold']:.1f}%" in card.locator(".threshold").inner_text()
        assert card.locator(".ood-flag").is_visible() == answer.get("ood", False)
    assert page.locator("img.cam").count() == 0

    page.check("#show-cams")
    page.wait_for_function("[...document.querySelectorAll('img.cam')].filter(i => i.complete && i.naturalWidth > 0 "
                           "&& i.offsetParent !== null).length === 4")
    for answer in api:
        heads = page.locator(f'.card[data-file="{answer["file"]}"] img.cam')
        assert sorted(heads.nth(i).get_attribute("data-head") for i in range(2)) == ["cancer", "organ"]
    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    page.uncheck("#show-cams")
    assert not page.locator("img.cam").first.is_visible()
    page.close()
