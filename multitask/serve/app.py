"""The HTTP API and its page: a run's Predictor behind FastAPI, loaded once, fed by a micro-batcher.

Routes::

    POST /predict   multipart upload of one or more images -> {"results": [one answer per file, in order]}
    POST /explain   the same, each answer with Grad-CAM overlays per head as PNG data URLs
    GET  /health    {"status": "ok", "model": ..., "engine": ..., "image_size": ..., "tasks": [...],
                     "batching": {"forward_passes": ..., "images": ...}, "limits": {...}, "run": {...}}
    GET  /          the page (static/index.html: one file, no build step, nothing fetched from elsewhere)

An answer is ``{"file", "error": null, "organ", "organ_prob", "organ_probabilities": {label: p}, "cancer",
"cancer_prob", "malignant_prob", "cancer_probabilities", "malignancy_threshold", "threshold_source", "ood",
"ood_score", "note"}`` (the columns of :meth:`multitask.predict.Predictor.table`: the threshold that decided this
file, its predicted organ's own one or the run's global one, and which; a single-task run has its own task's keys
only, a run without an out-of-distribution detector no ``ood`` keys). A file that is not a readable image gets
``{"file", "error": why}`` and never fails the others, and so does a file over the per-file limit; when no file of a
request can be answered the status is 422 (413 when every file was over a limit). A request over its total size
(413), slower than its time limit (408), or beyond the uploads the server reads at once (503) stops at once; one
that is not a multipart upload gets 400. Before any route, :class:`multitask.serve.guard.Guard` checks the Host
header (400) and the bearer token when there is one (401). Error bodies are ``{"detail": message}``: the message
a person can act on, never a stack trace (those go to the server's log). ``/health``'s ``run`` holds
:func:`multitask.serve.facts.run_facts` (the operating point, the organs never seen in training) for the page.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from multitask.errors import ConfigError, MultitaskError
from multitask.predict import probability_column
from multitask.settings import (
    SERVE_BODY_TIMEOUT_S,
    SERVE_HOST,
    SERVE_LOW_CONFIDENCE,
    SERVE_MAX_BATCH,
    SERVE_MAX_BUFFERED_BYTES,
    SERVE_MAX_FILES,
    SERVE_MAX_REQUEST_BYTES,
    SERVE_MAX_UPLOAD_BYTES,
    SERVE_MAX_UPLOADS,
    SERVE_MAX_WAIT_MS,
)
from multitask.taxonomy import MALIGNANT

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("static") / "index.html"


class Service:
    """A Predictor, its micro-batcher and a Grad-CAM lock: everything the routes share, created once."""

    def __init__(self, predictor, *, model_name: str, max_batch: int, max_wait_ms: float):
        from multitask.serve.batching import MicroBatcher

        self.predictor, self.model_name = predictor, model_name
        self.batcher = MicroBatcher(self._forward, max_batch=max_batch, max_wait_s=max_wait_ms / 1000)
        self._gradcam_lock = threading.Lock()  # one Grad-CAM at a time: it uses every core anyway
        size = predictor.image_size  # trace the forward pass now, not in the first user's request
        predictor.predict_arrays(np.zeros((1, size, size, 3), np.float32))

    def _forward(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """One forward pass for a batch of decoded images; one ``{output: row}`` per image."""
        outputs = self.predictor.predict_arrays(np.stack(images), batch_size=len(images))
        return [{name: value[i] for name, value in outputs.items()} for i in range(len(images))]

    def _decode_all(self, uploads) -> list[tuple[np.ndarray | None, str | None]]:
        from multitask.serve.uploads import decode_upload

        return [(None, upload.error) if upload.error else decode_upload(upload.data, self.predictor.image_size)
                for upload in uploads]

    async def answer(self, uploads, *, explain: bool = False) -> tuple[int, dict]:
        """HTTP status and body for the uploaded files."""
        from starlette.concurrency import run_in_threadpool

        decoded = await run_in_threadpool(self._decode_all, uploads)
        good = [i for i, (image, _) in enumerate(decoded) if image is not None]
        rows = await asyncio.gather(*(self.batcher(decoded[i][0]) for i in good))
        names = [upload.name for upload in uploads]
        errors = [why for _, why in decoded]
        outputs = {}  # none at all when no file could be read: the table fills in NaN
        for name in self.predictor.engine.output_names if rows else ():
            outputs[name] = np.full((len(uploads), *rows[0][name].shape), np.nan, np.float32)
            for i, row in zip(good, rows, strict=True):
                outputs[name][i] = row[name]
        frame = self.predictor.table(names, outputs, errors)
        results = [self._record(row) for row in frame.to_dict("records")]
        if explain and good:
            decided = self.predictor.decided_classes(frame.iloc[good])
            overlays = await run_in_threadpool(self._overlays, [decoded[i][0] for i in good], decided)
            for i, overlay in zip(good, overlays, strict=True):
                results[i]["explain"] = overlay
        if not good:
            shown = "; ".join(f"{r['file']}: {r['error']}" for r in results[:5])
            if all(upload.too_large for upload in uploads):  # nothing to answer, only because of the limits
                return 413, {"detail": f"every file is over a limit ({shown})", "results": results}
            return 422, {"detail": f"none of the {len(uploads)} file(s) is an image this server can read ({shown})",
                         "results": results}
        return 200, {"results": results}

    def _record(self, row) -> dict:
        if isinstance(row["error"], str):
            return {"file": row["path"], "error": row["error"]}
        record: dict[str, object] = {"file": row["path"], "error": None}
        for task in self.predictor.tasks:
            record[task] = row[task]
            record[f"{task}_prob"] = _number(row[f"{task}_prob"])
            if task == "cancer":
                record["malignant_prob"] = _number(row[probability_column("cancer", MALIGNANT)])
                record["malignancy_threshold"] = _number(row["malignancy_threshold"])
                record["threshold_source"] = row["threshold_source"]
            record[f"{task}_probabilities"] = {label: _number(row[probability_column(task, label)])
                                               for label in self.predictor.labels[task]}
        if "ood" in row:
            record["ood"], record["ood_score"] = bool(row["ood"]), _number(row["ood_score"])
        record["note"] = row["note"] if isinstance(row["note"], str) else None
        for key, value in row.items():  # columns the table gains later reach the page too (plain values only)
            if key not in record and key != "path" and not key.startswith("p_") and _plain(value):
                record[key] = _number(value) if isinstance(value, (float, np.floating)) else value
        return record

    def _overlays(self, images: list[np.ndarray], decided: dict[str, np.ndarray]) -> list[dict[str, str]]:
        """Grad-CAM overlay of each head's answer per image (the class the card shows), as PNG data URLs."""
        from multitask.explain import overlay, png_data_url

        with self._gradcam_lock:
            cams, _ = self.predictor.gradcam(np.stack(images), decided)
        return [{task: png_data_url(overlay(image, cams[task][i])) for task in self.predictor.tasks}
                for i, image in enumerate(images)]

    def close(self) -> None:
        self.batcher.close()


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value) -> bool:
    return value is None or isinstance(value, (str, bool, int, float, np.bool_, np.integer, np.floating))


def create_app(run: str | os.PathLike | None = None, *, engine: str = "keras", predictor=None,
               max_upload_bytes: int = SERVE_MAX_UPLOAD_BYTES, max_files: int = SERVE_MAX_FILES,
               max_request_bytes: int = SERVE_MAX_REQUEST_BYTES, body_timeout_s: float = SERVE_BODY_TIMEOUT_S,
               max_uploads: int = SERVE_MAX_UPLOADS, max_buffered_bytes: int = SERVE_MAX_BUFFERED_BYTES,
               max_batch: int = SERVE_MAX_BATCH, max_wait_ms: float = SERVE_MAX_WAIT_MS,
               allowed_hosts: list[str] | tuple[str, ...] | None = None, token: str | None = None,
               low_confidence: float = SERVE_LOW_CONFIDENCE):
    """The FastAPI app serving ``run`` with ``engine`` (or an already made ``predictor``), loaded once, here.

    ``allowed_hosts`` are the Host names it answers (default: this machine's loopback names, see
    :func:`multitask.serve.guard.trusted_hosts`); with ``token`` every route but the page needs ``Authorization:
    Bearer <token>``. The upload limits are described in :mod:`multitask.serve.uploads`; the page marks an organ
    answer below ``low_confidence`` as uncertain."""
    from starlette.requests import ClientDisconnect

    from multitask.predict import Predictor
    from multitask.serve.facts import run_facts
    from multitask.serve.guard import LOOPBACK_NAMES, Guard
    from multitask.serve.uploads import UploadBudget, UploadError, UploadLimits, read_uploads

    if predictor is None:
        if run is None:
            raise ConfigError("give the run directory to serve ($run) or a Predictor")
        predictor = Predictor.from_run(run, engine=engine)
    model_name = Path(run).resolve().name if run is not None else predictor.engine.name
    service = Service(predictor, model_name=model_name, max_batch=max_batch, max_wait_ms=max_wait_ms)
    page = PAGE.read_text(encoding="utf-8")
    facts = run_facts(run, predictor)
    limits = UploadLimits(max_file_bytes=max_upload_bytes, max_files=max_files, max_request_bytes=max_request_bytes,
                          body_timeout_s=body_timeout_s)
    budget = UploadBudget(max_uploads=max_uploads, max_buffered_bytes=max_buffered_bytes)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="multitask", summary="organ and benign/malignant from one image", lifespan=lifespan)
    app.state.service, app.state.budget = service, budget
    app.add_middleware(Guard, allowed_hosts=list(allowed_hosts or LOOPBACK_NAMES), token=token)

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError):
        # The rest of the body may still be on its way: close the connection rather than read it.
        headers = {"connection": "close"} | ({"retry-after": "5"} if exc.status == 503 else {})
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(MultitaskError)
    async def library_error(request: Request, exc: MultitaskError):
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)  # the trace stays here
        return JSONResponse({"detail": "internal error; the server's log has the details"}, status_code=500)

    async def respond(request: Request, *, explain: bool):
        with budget.slot() as hold:  # 503 beyond the uploads read at once; the bytes are held until answered
            try:
                uploads = await read_uploads(request.headers.get("content-type", ""), request.stream(),
                                             content_length=request.headers.get("content-length"), limits=limits,
                                             hold=hold)
            except ClientDisconnect:  # nobody is left to answer
                return JSONResponse({"detail": "the client went away during the upload"}, status_code=400)
            hold.done_reading()
            status, body = await service.answer(uploads, explain=explain)
            del uploads
        return JSONResponse(body, status_code=status)

    @app.post("/predict", summary="organ and benign/malignant for each uploaded image")
    async def predict(request: Request):
        return await respond(request, explain=False)

    @app.post("/explain", summary="/predict plus Grad-CAM overlays per head (PNG data URLs)")
    async def explain(request: Request):
        return await respond(request, explain=True)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": predictor.engine.name,
                "image_size": predictor.image_size, "tasks": list(predictor.tasks),
                "batching": {"forward_passes": service.batcher.passes, "images": service.batcher.images},
                "limits": {"max_file_bytes": limits.max_file_bytes, "max_files": limits.max_files,
                           "max_request_bytes": limits.max_request_bytes, "body_timeout_s": limits.body_timeout_s},
                "run": facts | {"low_confidence": low_confidence}}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index():
        return HTMLResponse(page)

    return app


@contextmanager
def running(app, *, host: str = SERVE_HOST, port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread of this process; yields its base URL, stops on exit.

    For tests and scripts (a browser needs a real socket); ``port=0`` takes a free one. ``multitask serve`` runs
    uvicorn in the foreground instead.
    """
    import socket
    import time

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{sock.getsockname()[1]} within {timeout:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
