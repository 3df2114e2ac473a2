"""Uploaded images, kept in memory from the socket to the model: read, limit, decode.

Starlette's own form parser spools every file over 1 MB to a temporary file on disk; medical images must not land
on a server's disk, so the multipart body is parsed here with python-multipart's streaming parser straight into
memory. The size limit is enforced while the bytes arrive: a file over it stops the upload with 413 before the
rest is read. Decoding uses :func:`multitask.data.decode_image`, the decoder and resize of ``multitask predict``,
so an upload gets the very answer the command gives for the same file.
"""

from __future__ import annotations

import functools
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

HEADER_ALLOWANCE = 64 * 1024  # multipart headers and boundaries, beyond the files themselves
MAX_PIXELS = 64_000_000  # decoding a larger image would take gigabytes (a "decompression bomb")


class UploadError(Exception):
    """The request as a whole cannot be served; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One uploaded file: its name as the client gave it, and its bytes."""

    name: str
    data: bytes


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _Reader:
    """python-multipart callbacks that collect file parts in memory, within the limits."""

    def __init__(self, *, max_bytes: int, max_files: int):
        self.max_bytes, self.max_files = max_bytes, max_files
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
            if len(self.uploads) >= self.max_files:
                raise UploadError(413, f"too many files: at most {self.max_files} per request")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.filename is None:
            return
        if len(self.part.data) + (end - start) > self.max_bytes:
            raise UploadError(413, f"{self.part.filename or 'a file'} is larger than the limit of "
                                   f"{_megabytes(self.max_bytes)} per file")
        self.part.data += data[start:end]

    def on_part_end(self) -> None:
        if self.part.filename is not None and (self.part.filename or self.part.data):  # "" + no data: empty input
            self.uploads.append(Upload(self.part.filename, bytes(self.part.data)))


async def read_uploads(content_type: str, body: AsyncIterator[bytes], *, content_length: str | None = None,
                       max_bytes: int, max_files: int) -> list[Upload]:
    """The files of a multipart/form-data body, in order; :class:`UploadError` for a request that cannot be used."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        raise UploadError(400, "send the images as multipart/form-data, e.g. curl -F files=@scan.jpg "
                               "http://127.0.0.1:8000/predict")
    if content_length and content_length.isdigit() and \
            int(content_length) > max_files * (max_bytes + HEADER_ALLOWANCE):
        raise UploadError(413, f"the request is larger than {max_files} files of {_megabytes(max_bytes)}")
    reader = _Reader(max_bytes=max_bytes, max_files=max_files)
    try:
        parser = MultipartParser(options[b"boundary"], reader.callbacks())
        async for chunk in body:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise UploadError(400, f"malformed multipart/form-data body ({exc})") from None
    if not reader.uploads:
        raise UploadError(400, "no files in the request: send one or more images as multipart/form-data "
                               "file fields, e.g. curl -F files=@scan.jpg")
    return reader.uploads


def _megabytes(n: int) -> str:
    return f"{n / 1024 / 1024:.3g} MB" if n >= 1024 * 1024 else f"{n} bytes"


def decode_upload(data: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """``(image, None)``: float32 RGB 0..255 at ``image_size`` as :func:`multitask.data.load_image` makes it; or
    ``(None, why)`` for bytes that are not an image this server can read."""
    import tensorflow as tf
    from PIL import Image, UnidentifiedImageError

    from multitask.data import decoding_problem
    from multitask.predict import TF_ONLY_PROBLEM

    if not data:
        return None, "empty file (0 bytes)"
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
