"""Uploaded images, kept in memory from the socket to the model: read, limit, decode.

Starlette's own form parser spools every file over 1 MB to a temporary file on disk; medical images must not land
on a server's disk, so the multipart body is parsed here with python-multipart's streaming parser straight into
memory. Every limit is enforced while the bytes arrive, never after: a file over the per-file limit is dropped as
it streams in and answered with its own error (the other files are answered); a request over its total, or one
that takes longer than its time limit, stops at once (413, 408) before the rest is read; and
:class:`UploadBudget` caps, server-wide, how many requests read uploads at once and how many bytes they hold in
memory together (503 beyond). So slow or never-ending uploads cannot take the server's memory. Decoding uses
:func:`multitask.data.decode_image`, the decoder and resize of ``multitask predict``, so an upload gets the very
answer the command gives for the same file.
"""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from multitask.settings import (
    SERVE_BODY_TIMEOUT_S,
    SERVE_MAX_BUFFERED_BYTES,
    SERVE_MAX_FILES,
    SERVE_MAX_REQUEST_BYTES,
    SERVE_MAX_UPLOAD_BYTES,
    SERVE_MAX_UPLOADS,
)

MAX_PIXELS = 64_000_000  # decoding a larger image would take gigabytes (a "decompression bomb")


class UploadError(Exception):
    """The request as a whole cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class UploadLimits:
    """What one request may send: per file, files, bytes in all (as they arrive), and seconds for the whole body."""

    max_file_bytes: int = SERVE_MAX_UPLOAD_BYTES
    max_files: int = SERVE_MAX_FILES
    max_request_bytes: int = SERVE_MAX_REQUEST_BYTES
    body_timeout_s: float = SERVE_BODY_TIMEOUT_S


class UploadBudget:
    """Server-wide: at most ``max_uploads`` requests read their upload at once, and together they hold at most
    ``max_buffered_bytes`` of file data in memory until answered. Used from the event loop's thread only."""

    def __init__(self, *, max_uploads: int = SERVE_MAX_UPLOADS, max_buffered_bytes: int = SERVE_MAX_BUFFERED_BYTES):
        self.max_uploads, self.max_buffered_bytes = max_uploads, max_buffered_bytes
        self.active = self.buffered = 0

    @contextmanager
    def slot(self) -> Iterator[_Hold]:
        """One request's share: refused with 503 when ``max_uploads`` are already being read. It counts as reading
        until :meth:`_Hold.done_reading`; the bytes it holds are given back when the request is answered (or fails)."""
        if self.active >= self.max_uploads:
            raise UploadError(503, f"busy: {self.active} uploads are in progress, the most this server reads at "
                                   "once; retry in a few seconds")
        self.active += 1
        hold = _Hold(self)
        try:
            yield hold
        finally:
            hold.done_reading()
            hold.release(hold.bytes)


class _Hold:
    """One request's share of an :class:`UploadBudget`: a reading slot, then the bytes it holds."""

    def __init__(self, budget: UploadBudget):
        self.budget, self.bytes, self.reading = budget, 0, True

    def done_reading(self) -> None:
        """The upload is in: the slot goes to the next request, the bytes stay held until the answer is out."""
        if self.reading:
            self.reading = False
            self.budget.active -= 1

    def take(self, n: int) -> None:
        if self.budget.buffered + n > self.budget.max_buffered_bytes:
            raise UploadError(503, f"busy: the uploads in progress hold {_megabytes(self.budget.buffered)}, the "
                                   "most this server keeps in memory; retry in a few seconds")
        self.budget.buffered += n
        self.bytes += n

    def release(self, n: int) -> None:
        self.budget.buffered -= n
        self.bytes -= n


@dataclass
class Upload:
    """One uploaded file: its name as the client gave it, and its bytes; or why it was not kept (``error``, with
    ``too_large`` when it was over a limit)."""

    name: str
    data: bytes | bytearray
    error: str | None = None
    too_large: bool = False


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)
    refused: str | None = None  # why this file's bytes are being dropped as they arrive


class _Reader:
    """python-multipart callbacks that collect file parts in memory, within the limits."""

    def __init__(self, limits: UploadLimits, hold: _Hold | None):
        self.max_bytes, self.max_files = limits.max_file_bytes, limits.max_files
        self.hold = hold
        self.files = 0
        self.uploads: list[Upload] = []
        self.part = _Part()
        self.header_name = self.header_value = b""

    def callbacks(self) -> dict:
        return {name: getattr(self, name) for name in ("on_part_begin", "on_header_field", "on_header_value",
                                                       "on_header_end", "on_headers_finished", "on_part_data",
                                                       "on_part_end")}

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        from python_multipart.multipart import parse_options_header

        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        if b"filename" in options:  # a file; plain form fields are ignored
            self.part.filename = options[b"filename"].decode("utf-8", "replace")
            self.files += 1
            if self.files > self.max_files:
                self.part.refused = f"over the limit of {self.max_files} files per request: send it in another one"

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.filename is None or self.part.refused:
            return
        if len(self.part.data) + (end - start) > self.max_bytes:  # this file alone is refused; the others go on
            self.part.refused = f"larger than the limit of {_megabytes(self.max_bytes)} per file"
            if self.hold is not None:
                self.hold.release(len(self.part.data))
            self.part.data = bytearray()
            return
        if self.hold is not None:
            self.hold.take(end - start)
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        part = self.part
        if part.refused:
            self.uploads.append(Upload(part.filename or "", b"", error=part.refused, too_large=True))
        elif part.filename is not None and (part.filename or part.data):  # "" + no data: an empty file input
            self.uploads.append(Upload(part.filename, part.data))  # no copy: the bytes are held once


async def read_uploads(content_type: str, body: AsyncIterator[bytes], *, content_length: str | None = None,
                       limits: UploadLimits = UploadLimits(), hold: _Hold | None = None) -> list[Upload]:
    """The files of a multipart/form-data body, in order, read within ``limits`` (and ``hold``'s share of the
    server's budget); :class:`UploadError` for a request that cannot be used."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadError(400, "send the images as multipart/form-data, e.g. curl -F files=@scan.jpg "
                               "http://127.0.0.1:8000/predict")
    too_big = (f"the request is larger than the limit of {_megabytes(limits.max_request_bytes)} per request: send "
               "the files in several requests")
    if content_length and content_length.isdigit() and int(content_length) > limits.max_request_bytes:
        raise UploadError(413, too_big)
    reader = _Reader(limits, hold)
    loop = asyncio.get_running_loop()
    deadline, received = loop.time() + limits.body_timeout_s, 0
    chunks = aiter(body)
    try:
        parser = MultipartParser(options[b"boundary"], reader.callbacks())
        while True:
            try:  # every wait is bounded by what is left of the request's time
                chunk = await asyncio.wait_for(anext(chunks), max(0.0, deadline - loop.time()))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:  # not the built-in TimeoutError before Python 3.11
                raise UploadError(408, f"the upload did not arrive within {limits.body_timeout_s:g} s; send it "
                                       "again, or fewer files at once on a slow link") from None
            received += len(chunk)
            if received > limits.max_request_bytes:  # counted as the bytes arrive, never after
                raise UploadError(413, too_big)
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart/form-data body ({exc})") from None
    if not reader.uploads:
        raise UploadError(400, "no files in the request: send one or more images as multipart/form-data "
                               "file fields, e.g. curl -F files=@scan.jpg")
    return reader.uploads


def _megabytes(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.3g} MB"
    return f"{n / 1024:.3g} KB" if n >= 1024 else f"{n} bytes"


def decode_upload(data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``: float32 RGB 0..255 at ``image_size`` as :func:`multitask.data.load_image` makes it; or
    ``(None, why)`` for bytes that are not an image this server can read."""
    import tensorflow as tf
    from PIL import Image, UnidentifiedImageError

    from multitask.data import decoding_problem
    from multitask.predict import TF_ONLY_PROBLEM

    if not data:
        return None, "empty file (0 bytes)"
    data = bytes(data)  # the upload's buffer is a bytearray; TensorFlow's decoder wants bytes
    try:  # the header alone: refuses what is no image at all, or too large to decode, before decoding anything
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
    except UnidentifiedImageError:
        return None, "not an image (unrecognised content)"
    except Image.DecompressionBombError:  # PIL's own refusal, far above MAX_PIXELS
        return None, f"image larger than the limit of {MAX_PIXELS:,} pixels"
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"corrupt image ({exc})"
    if width * height > MAX_PIXELS:
        return None, f"image of {width}x{height} pixels is larger than the limit of {MAX_PIXELS:,} pixels"
    try:
        return _decoder(image_size)(data).numpy(), None
    except (tf.errors.OpError, ValueError):
        return None, decoding_problem(io.BytesIO(data)) or TF_ONLY_PROBLEM


@functools.lru_cache(maxsize=4)
def _decoder(image_size: int):
    """:func:`multitask.data.decode_image` traced once: one graph call per upload instead of a few eager ops, which
    takes decoding from 6-7 ms to 1.5-4.5 ms per 128 px JPEG here (the same pixels: the same ops run)."""
    import tensorflow as tf

    from multitask.data import decode_image

    return tf.function(lambda data: decode_image(data, image_size), input_signature=[tf.TensorSpec([], tf.string)])
