"""``multitask serve``: a run behind an HTTP API (FastAPI + uvicorn) and one static page.

:mod:`multitask.serve.app` builds the app, :mod:`multitask.serve.batching` batches concurrent requests into one
forward pass, :mod:`multitask.serve.uploads` reads and decodes uploads in memory within limits enforced as the bytes
arrive, :mod:`multitask.serve.guard` decides who may talk to the server (listening address, trusted Host names,
bearer token), :mod:`multitask.serve.facts` reads what the page says about the run, and ``static/index.html`` is the
page. Needs the ``serve`` extra (``pip install 'multitask[serve]'``).
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """:func:`multitask.serve.app.create_app` (imported on call: FastAPI is an optional dependency)."""
    from multitask.serve.app import create_app

    return create_app(*args, **kwargs)
