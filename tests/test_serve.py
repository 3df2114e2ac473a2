"""multitask serve: the HTTP API answers as `multitask predict` does, batches concurrent requests, refuses safely."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import struct
import tempfile
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="multitask serve needs the serve extra: pip install 'multitask[serve]'")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from multitask import cli  # noqa: E402
from multitask.predict import Predictor  # noqa: E402
from multitask.serve.app import create_app  # noqa: E402
from multitask.settings import SERVE_HOST  # noqa: E402


class CountingEngine:
    """The predictor's engine, counting forward passes and their batch sizes."""

    def __init__(self, engine):
        self.engine, self.batch_sizes = engine, []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, images):
        self.batch_sizes.append(len(images))
        return self.engine(images)


@pytest.fixture(scope="module")
def predictor(joint_predictor) -> Predictor:
    return joint_predictor


@pytest.fixture(scope="module")
def client(joint_run, predictor):
    with TestClient(create_app(joint_run, predictor=predictor), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def images(demo_data) -> list:
    """Two demo images of different organs."""
    files = sorted(demo_data.rglob("*.jpg"))
    return [next(f for f in files if f.parent.name == subclass) for subclass in ("brain_glioma", "lung_aca")]


def upload(*files) -> list:
    """Multipart ``files`` fields: paths, or (name, bytes) pairs."""
    parts = []
    for f in files:
        name, data = (f.name, f.read_bytes()) if hasattr(f, "read_bytes") else f
        parts.append(("files", (name, data, "application/octet-stream")))
    return parts


def assert_no_traceback(response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text


def test_health_names_the_model_and_its_input_size(client, joint_run):
    body = client.get("/health").json()
    assert body.pop("batching").keys() == {"forward_passes", "images"}
    assert body == {"status": "ok", "model": joint_run.name, "engine": "keras", "image_size": 75,
                    "tasks": ["organ", "cancer"]}


def test_the_page_is_served_and_loads_nothing_from_elsewhere(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'type="file"' in page and "explain" in page
    assert "http://" not in page and "https://" not in page  # no CDN: works offline


def test_predict_answers_as_the_predictor_does_on_the_same_files(client, predictor, images):
    response = client.post("/predict", files=upload(*images))
    assert response.status_code == 200
    results = response.json()["results"]
    frame = predictor.predict(images)
    assert [r["file"] for r in results] == [f.name for f in images]
    for result, (_, row) in zip(results, frame.iterrows(), strict=True):
        assert result["error"] is None
        assert result["organ"] == row["organ"] and result["cancer"] == row["cancer"]
        assert result["malignancy_threshold"] == pytest.approx(predictor.threshold)
        for task in ("organ", "cancer"):
            assert result[f"{task}_prob"] == pytest.approx(row[f"{task}_prob"], abs=1e-5)
            for label, p in result[f"{task}_probabilities"].items():
                assert p == pytest.approx(row[f"p_{task}_{label}"], abs=1e-5)
        assert result["malignant_prob"] == pytest.approx(row["p_cancer_Malignant"], abs=1e-5)
        if "ood" in frame.columns:
            assert result["ood"] == bool(row["ood"])
            assert result["ood_score"] == pytest.approx(row["ood_score"], rel=1e-4, abs=1e-4)


def test_a_bad_file_gets_its_error_and_never_fails_the_others(client, images):
    good = images[0].read_bytes()
    response = client.post("/predict", files=upload(images[0], ("notes.jpg", b"not an image at all"),
                                                    ("cut.jpg", good[: len(good) // 2]), ("empty.png", b"")))
    assert response.status_code == 200
    answered, text, truncated, empty = response.json()["results"]
    assert answered["error"] is None and answered["organ"]
    assert text == {"file": "notes.jpg", "error": "not an image (unrecognised content)"}
    assert truncated["file"] == "cut.jpg" and truncated["error"] and "organ" not in truncated
    assert empty["error"] == "empty file (0 bytes)"


def test_non_images_only_are_refused_with_the_reason(client):
    response = client.post("/predict", files=upload(("report.pdf", b"%PDF-1.4 not an image")))
    assert response.status_code == 422
    assert "report.pdf: not an image" in response.json()["detail"]
    assert_no_traceback(response)
    response = client.post("/predict", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; "
                                                                                     "boundary=other"})
    assert response.status_code == 400
    assert_no_traceback(response)
    response = client.post("/predict", json={"image": "scan.jpg"})
    assert response.status_code == 400 and "multipart/form-data" in response.json()["detail"]
    response = client.post("/predict", data={"note": "no file here"}, files=[("x", ("", b"", "text/plain"))])
    assert response.status_code == 400 and "no files" in response.json()["detail"]


def test_an_upload_over_the_limit_is_refused_with_413(joint_run, predictor, images):
    size = images[0].stat().st_size
    with TestClient(create_app(joint_run, predictor=predictor, max_upload_bytes=size - 1)) as small:
        response = small.post("/predict", files=upload(images[0]))
        assert response.status_code == 413
        assert images[0].name in response.json()["detail"] and "limit" in response.json()["detail"]
        assert small.post("/predict", files=upload(("tiny.png", _png(8)))).status_code == 200


@pytest.mark.parametrize("side", [9000, 20000])  # over MAX_PIXELS; over PIL's own decompression-bomb limit
def test_an_image_too_large_to_decode_is_refused_from_its_header(client, side):
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 100)))  # a PNG that claims side x side RGB pixels
    response = client.post("/predict", files=upload(("bomb.png", png)))
    assert response.status_code == 422
    assert "larger than the limit" in response.json()["results"][0]["error"]


def test_uploads_are_never_written_to_disk(client, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "TemporaryFile", "NamedTemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, refuse)
    big = _png(700, noise=True)  # over 1 MB: Starlette's own form parser would spool it to disk
    assert len(big) > 1024 * 1024
    response = client.post("/predict", files=upload(("big.png", big)))
    assert response.status_code == 200 and response.json()["results"][0]["error"] is None


def test_explain_adds_a_png_overlay_per_head(client, images):
    response = client.post("/explain", files=upload(*images, ("bad.jpg", b"xx")))
    assert response.status_code == 200
    results = response.json()["results"]
    for result in results[:2]:
        assert set(result["explain"]) == {"organ", "cancer"}
        for url in result["explain"].values():
            prefix, encoded = url.split(",", 1)
            assert prefix == "data:image/png;base64"
            overlay = Image.open(io.BytesIO(base64.b64decode(encoded)))
            assert overlay.format == "PNG" and overlay.size == (75, 75) and overlay.mode == "RGB"
    assert results[2]["error"] and "explain" not in results[2]


def test_concurrent_requests_share_one_forward_pass(joint_run, predictor, images):
    counted = copy.copy(predictor)
    counted.engine = engine = CountingEngine(predictor.engine)
    # A long window cannot race; a batch of 6 is full, so it goes as soon as all six are there.
    app = create_app(joint_run, predictor=counted, max_wait_ms=5000, max_batch=6)
    files = [images[i % 2] for i in range(6)]

    async def send_all():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.post("/predict", files=upload(f)) for f in files))

    calls = len(engine.batch_sizes)
    responses = asyncio.run(send_all())
    app.state.service.close()
    assert [r.status_code for r in responses] == [200] * 6
    passes = engine.batch_sizes[calls:]
    assert sum(passes) == 6 and len(passes) <= 2, passes  # one request alone would make it 6 passes of 1
    assert list(app.state.service.batcher.recent) == passes
    organs = [r.json()["results"][0]["organ"] for r in responses]
    assert organs[0::2] == [organs[0]] * 3 and organs[1::2] == [organs[1]] * 3


def test_an_internal_failure_answers_500_without_a_stack_trace(joint_run, predictor, images):
    broken = copy.copy(predictor)
    app = create_app(joint_run, predictor=broken)
    broken.engine = _Broken(predictor.engine)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.post("/predict", files=upload(images[0]))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; the server's log has the details"}
    assert_no_traceback(response)
    assert "secret" not in response.text


def test_serve_cli_loads_the_run_and_listens_on_localhost(joint_run, predictor, monkeypatch, capsys):
    import uvicorn

    calls, loaded = [], []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setattr(Predictor, "from_run", lambda run, engine: loaded.append((run, engine)) or predictor)
    assert cli.main(["serve", str(joint_run), "--port", "8123", "--engine", "onnx"]) == 0
    assert loaded == [(str(joint_run), "onnx")]
    (app, options), = calls
    assert options["host"] == SERVE_HOST == "127.0.0.1" and options["port"] == 8123
    assert {"/predict", "/explain", "/health", "/"} <= {route.path for route in app.routes}
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    app.state.service.close()


class _Broken:
    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def __call__(self, images):
        raise RuntimeError("secret internals at /srv/model")


def _png(side: int, *, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (side, side, 3), np.uint8) if noise else np.full((side, side, 3), 128, np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
