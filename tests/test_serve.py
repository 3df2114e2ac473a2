"""multitask serve: the HTTP API answers as `multitask predict` does, batches concurrent requests, refuses safely."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import struct
import tempfile
import zlib
from pathlib import Path

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
from multitask.serve.guard import host_name, trusted_hosts  # noqa: E402
from multitask.serve.uploads import UploadBudget, UploadError, UploadLimits, read_uploads  # noqa: E402
from multitask.settings import SERVE_HOST, SERVE_MAX_REQUEST_BYTES, SERVE_MAX_UPLOAD_BYTES  # noqa: E402

LOCAL = "http://127.0.0.1"  # the Host every test client sends: a loopback name the server trusts


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
    with TestClient(create_app(joint_run, predictor=predictor), base_url=LOCAL,
                    raise_server_exceptions=False) as client:
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
    assert body.pop("limits") == {"max_file_bytes": SERVE_MAX_UPLOAD_BYTES, "max_files": 64,
                                  "max_request_bytes": SERVE_MAX_REQUEST_BYTES, "body_timeout_s": 60.0}
    assert body.pop("run").keys() >= {"operating_point", "unseen_organs", "train_organs", "ood_detector"}
    assert body == {"status": "ok", "model": joint_run.name, "engine": "keras", "image_size": 75,
                    "tasks": ["organ", "cancer"]}


def test_health_tells_the_page_the_operating_point_and_the_organs_never_trained_on(joint_run, predictor,
                                                                                   tmp_path):
    import json
    import shutil

    import pandas as pd

    run = shutil.copytree(joint_run, tmp_path / "run")
    split = pd.read_csv(run / "split.csv")
    mouth = split["subclass"].str.startswith("oral_") & (split["split"] == "train")
    split.loc[mouth, "split"] = "val"  # the organ head still has a Mouth class, but no training image taught it
    split.to_csv(run / "split.csv", index=False)
    with TestClient(create_app(run, predictor=predictor, low_confidence=0.7), base_url=LOCAL) as http:
        facts = http.get("/health").json()["run"]
    calibration = json.loads((run / "config.json").read_text())["calibration"]
    point = facts["operating_point"]
    assert point["malignancy_threshold"] == pytest.approx(calibration["malignancy_threshold"])
    assert point["target_sensitivity"] == calibration["target_sensitivity"]
    assert point["validation_sensitivity"] == pytest.approx(calibration["validation"]["sensitivity"])
    assert point["validation_images"] == calibration["validation"]["images"]
    assert facts["unseen_organs"] == ["Mouth"]
    train = split[split["split"] == "train"]
    assert facts["train_organs"]["Lung"] == train["subclass"].str.startswith("lung_").sum() > 0
    assert facts["ood_detector"] is True and facts["low_confidence"] == 0.7


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


def test_an_oversized_file_fails_only_itself(joint_run, predictor, images):
    size = images[0].stat().st_size
    with TestClient(create_app(joint_run, predictor=predictor, max_upload_bytes=size - 1), base_url=LOCAL) as small:
        response = small.post("/predict", files=upload(("tiny.png", _png(8)), images[0], ("notes.txt", b"text")))
        assert response.status_code == 200  # the batch is answered; the big file gets its own error
        tiny, big, notes = response.json()["results"]
        assert tiny["error"] is None and tiny["organ"]
        assert big.keys() == {"file", "error"} and big["file"] == images[0].name
        assert big["error"].startswith("larger than the limit of ") and big["error"].endswith(" KB per file")
        assert notes["error"].startswith("not an image")
        response = small.post("/predict", files=upload(images[0]))  # nothing else to answer: 413
        assert response.status_code == 413
        assert images[0].name in response.json()["detail"] and "limit" in response.json()["detail"]
        assert response.json()["results"][0]["error"].startswith("larger than the limit")
        assert small.app.state.budget.active == small.app.state.budget.buffered == 0


def test_files_over_the_count_limit_get_an_error_and_the_first_are_answered(joint_run, predictor, images):
    with TestClient(create_app(joint_run, predictor=predictor, max_files=2), base_url=LOCAL) as http:
        response = http.post("/predict", files=upload(*images, ("third.png", _png(8))))
    assert response.status_code == 200
    first, second, third = response.json()["results"]
    assert first["organ"] and second["organ"]
    assert third["error"].startswith("over the limit of 2 files per request")


def test_a_request_over_its_total_stops_while_the_bytes_arrive():
    sent = []

    async def endless():  # a body that never ends: only the limit can stop it
        yield b"--b\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\n"
        while True:
            sent.append(64 * 1024)
            yield b"\0" * (64 * 1024)

    limits = UploadLimits(max_file_bytes=10**9, max_request_bytes=1024 * 1024)
    with pytest.raises(UploadError) as refused:
        asyncio.run(read_uploads("multipart/form-data; boundary=b", endless(), limits=limits))
    assert refused.value.status == 413 and "larger than the limit of 1 MB per request" in str(refused.value)
    assert sum(sent) <= 1024 * 1024 + 64 * 1024  # it stopped at the limit, not at the end (there is none)
    with pytest.raises(UploadError) as declared:  # a Content-Length over the limit is refused before any read
        asyncio.run(read_uploads("multipart/form-data; boundary=b", endless(), limits=limits,
                                 content_length=str(2 * 1024 * 1024)))
    assert declared.value.status == 413


def test_a_slow_body_times_out_with_408():
    import time

    async def trickle():
        yield b"--b\r\nContent-Disposition: form-data; name=files; filename=a.png\r\n\r\n"
        while True:
            await asyncio.sleep(0.05)
            yield b"x"

    start = time.monotonic()
    with pytest.raises(UploadError) as slow:
        asyncio.run(read_uploads("multipart/form-data; boundary=b", trickle(),
                                 limits=UploadLimits(body_timeout_s=0.5)))
    assert slow.value.status == 408 and "within 0.5 s" in str(slow.value)
    assert 0.4 < time.monotonic() - start < 5


def test_the_upload_budget_caps_concurrent_uploads_and_the_bytes_they_hold():
    budget = UploadBudget(max_uploads=2, max_buffered_bytes=100)
    with budget.slot() as first, budget.slot():
        with pytest.raises(UploadError) as busy, budget.slot():
            pass
        assert busy.value.status == 503
        first.take(60)
        first.done_reading()  # its slot goes to the next request; its bytes stay held until answered
        with budget.slot() as third:
            with pytest.raises(UploadError) as full:
                third.take(41)
            assert full.value.status == 503 and budget.buffered == 60
    assert budget.active == budget.buffered == 0


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
        async with httpx.AsyncClient(transport=transport, base_url=LOCAL) as http:
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
    with TestClient(app, base_url=LOCAL, raise_server_exceptions=False) as http:
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
    with TestClient(app, base_url="http://localhost:8123") as http:  # no token on loopback; foreign Hosts refused
        assert http.get("/health").status_code == 200
        assert http.get("/health", headers={"host": "rebound.example:8123"}).status_code == 400


TOKEN = "s3cret-token-of-24-chars"


@pytest.mark.parametrize(("argv", "says"), [
    (["--host", "0.0.0.0"], "--host 0.0.0.0 serves the images sent to it to the network"),
    (["--host", "192.168.1.20"], "add --token TOKEN"),
    (["--host", "0.0.0.0", "--token", "short"], "--token must have at least 16 characters"),
    (["--token", TOKEN, "--insecure-no-token"], "either --token or --insecure-no-token"),
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--port", "0"], "--port must be between 1 and 65535, got 0"),
])
def test_serve_refuses_an_unsafe_address_in_one_line_before_loading(joint_run, monkeypatch, capsys, argv, says):
    monkeypatch.delenv("MULTITASK_SERVE_TOKEN", raising=False)
    monkeypatch.setattr(Predictor, "from_run", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert cli.main(["serve", str(joint_run), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("insecure", [False, True])
def test_serve_on_a_network_address_needs_the_token_or_says_it_is_insecure(joint_run, predictor, monkeypatch,
                                                                           capsys, insecure):
    import uvicorn

    calls = []
    monkeypatch.delenv("MULTITASK_SERVE_TOKEN", raising=False)
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: calls.append((app, options)))
    monkeypatch.setattr(Predictor, "from_run", lambda run, engine: predictor)
    extra = ["--insecure-no-token"] if insecure else ["--token", TOKEN]
    assert cli.main(["serve", str(joint_run), "--host", "0.0.0.0", "--allowed-host", "scanner.lan", *extra]) == 0
    (app, options), = calls
    assert options["host"] == "0.0.0.0"
    assert ("WARNING: --insecure-no-token" in capsys.readouterr().err) == insecure
    with TestClient(app, base_url="http://scanner.lan:8000") as http:
        assert http.get("/health").status_code == (200 if insecure else 401)
        assert http.get("/health", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert http.get("/health", headers={"host": "rebound.example"}).status_code == 400


def test_a_token_guards_every_route_but_the_page(joint_run, predictor, images):
    with TestClient(create_app(joint_run, predictor=predictor, token=TOKEN), base_url=LOCAL) as http:
        assert http.get("/").status_code == 200  # the page carries no data; it asks for the token
        refused = http.get("/health")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in refused.json()["detail"]
        for wrong in ("Bearer " + TOKEN[:-1] + "x", "Basic " + TOKEN, TOKEN):
            assert http.get("/health", headers={"authorization": wrong}).status_code == 401
        assert http.post("/predict", files=upload(images[0])).status_code == 401
        good = http.post("/predict", files=upload(images[0]), headers={"authorization": f"Bearer {TOKEN}"})
        assert good.status_code == 200 and good.json()["results"][0]["organ"]


def test_a_request_naming_a_foreign_host_is_refused(client):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 still sends its own Host."""
    refused = client.get("/health", headers={"host": "evil.example"})
    assert refused.status_code == 400 and "--allowed-host" in refused.json()["detail"]
    assert client.post("/predict", headers={"host": "evil.example:8000"}, files=upload(("a.png", _png(8)))
                       ).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST."):
        assert client.get("/health", headers={"host": host}).status_code == 200, host


def test_host_names_and_the_trusted_list():
    import socket

    assert [host_name(h) for h in ("[::1]:8000", "Example.ORG.:80", "localhost", "10.0.0.2:1")] == \
        ["::1", "example.org", "localhost", "10.0.0.2"]
    assert trusted_hosts("127.0.0.1", ["proxy.lan"]) == ["127.0.0.1", "localhost", "::1", "proxy.lan"]
    assert socket.gethostname().lower() in trusted_hosts("0.0.0.0")
    assert "0.0.0.0" not in trusted_hosts("0.0.0.0")


class _Statuses:
    """ASGI wrapper that records each request's response status, as the server sent it."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                self.seen.append(message["status"])
            await send(message)

        await self.app(scope, receive, record if scope["type"] == "http" else send)


def _rss(field: str) -> int:
    """This process's ``VmRSS`` (now) or ``VmHWM`` (its peak since :func:`_reset_peak_rss`), in bytes."""
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{field}:")[1].split()[0]) * 1024


def _reset_peak_rss() -> bool:
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _hostile_upload(port: int, *, chunk: int, pause: float, deadline: float) -> str:
    """The slow-upload attack: one chunked multipart request of 63 parts of 19 MB, sent ``chunk`` bytes at a time
    with ``pause`` s between chunks, never finished; stops when the server answers or closes, or at ``deadline``."""
    import select
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        try:
            for part in range(63):
                head = (b"\r\n" if part else b"") + (  # a boundary is CRLF + --b: 63 separate parts
                    b"--b\r\nContent-Disposition: form-data; name=files; filename=p%d.png\r\n\r\n" % part)
                sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
                for _ in range(19 * 1024 * 1024 // chunk):
                    if select.select([sock], [], [], 0)[0]:  # the server answered, or closed
                        return sock.recv(100).split(b"\r\n")[0].decode() or "closed (EOF)"
                    if time.monotonic() > deadline:
                        return "still sending at the deadline"
                    sock.sendall(b"%x\r\n" % chunk + b"\0" * chunk + b"\r\n")
                    time.sleep(pause)
        except OSError as exc:  # the server closed the connection under it
            return f"closed ({type(exc).__name__})"
    return "sent everything"


@pytest.mark.skipif(not _reset_peak_rss(), reason="measures the peak RSS through /proc/self/clear_refs (Linux)")
def test_slow_never_ending_uploads_keep_memory_bounded_and_others_are_answered(joint_run, predictor, images):
    """Issue 21's memdos pattern against uvicorn on 127.0.0.1: three clients each start a chunked multipart upload
    of 63 x 19 MB and never finish it (one as fast as the server reads, one at ~12 MB/s, one trickling). Without
    limits they took the server from 1.3 to 4.9 GB. Here each is cut off by a limit: the fast one at the
    per-request 48 MB (413; 408 on a machine too busy to read 48 MB in time), the slow ones at the body time limit
    (408, scaled down from 60 s to 3 s); a normal client is answered meanwhile, and the server's peak RSS never
    grows by 300 MB (the issue's bound; about +70 MB measured)."""
    import threading
    import time

    from multitask.serve.app import running

    app = create_app(joint_run, predictor=predictor, body_timeout_s=3.0)  # the other limits are the defaults
    recorder = _Statuses(app)
    with running(recorder) as url:
        port = int(url.rsplit(":", 1)[1])
        assert httpx.post(f"{url}/predict", files=upload(images[0]), timeout=60).status_code == 200  # warm
        baseline = _rss("VmRSS")
        assert _reset_peak_rss()  # from here VmHWM is the peak: the kernel's own, no sampling to miss it
        deadline = time.monotonic() + 20  # the clients stop by then whatever happens: the test cannot hang
        outcomes = [None] * 3
        rates = [(1024 * 1024, 0.0), (256 * 1024, 0.02), (4 * 1024, 0.1)]

        def attack(i):
            outcomes[i] = _hostile_upload(port, chunk=rates[i][0], pause=rates[i][1], deadline=deadline)

        threads = [threading.Thread(target=attack, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)  # all three are mid-upload
        start = time.monotonic()
        normal = httpx.post(f"{url}/predict", files=upload(images[1]), timeout=30)
        latency = time.monotonic() - start
        for thread in threads:
            thread.join(30)
        budget = app.state.budget
        growth = (_rss("VmHWM") - baseline) / 2**20
        print(f"\nslow uploads: RSS {baseline / 2**20:.0f} MB -> peak +{growth:.0f} MB; normal client answered in "
              f"{latency:.2f} s; clients saw {outcomes}; server answered {recorder.seen}")
        assert normal.status_code == 200 and normal.json()["results"][0]["organ"]
        statuses = recorder.seen[1:]  # after the warm-up: the normal client and the three attackers
        assert len(statuses) == 4 and statuses.count(200) == 1 and set(statuses) - {200} <= {408, 413}, statuses
        assert all(o is not None and o.startswith(("HTTP/1.1 4", "closed")) for o in outcomes), outcomes
        assert growth < 300, f"RSS grew by {growth:.0f} MB"
        assert budget.active == budget.buffered == 0


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
