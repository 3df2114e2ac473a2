"""Dynamic micro-batching: images that arrive together share one forward pass.

A forward pass of 8 images costs far less than 8 passes of one (the backbone's kernels are reused across the
batch), so a server that answered each request alone would be several times slower than offline ``predict``.
:class:`MicroBatcher` queues single items from any thread or event loop; one worker thread takes the first waiting
item, gathers whatever else arrives until the batch is full or that first item has waited ``max_wait_s``, and
runs the whole batch at once. The wait is counted from the first item's *arrival*, not from when the worker got to
it: items that queued up while the previous batch was running have already waited, so they go at once, and a busy
server never idles. The worker is the only thread that touches the model, so the event loop stays free to accept
requests while a batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Item:
    payload: Any
    future: Future
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher:
    """``run_batch(list of payloads) -> list of results`` (same order), called on batches of up to ``max_batch``."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch: int, max_wait_s: float,
                 name: str = "micro-batcher"):
        if max_batch < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_s >= 0, got {max_batch} and {max_wait_s}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, max_batch, max_wait_s
        self.passes = self.images = 0  # what the batching achieved: images / passes is the mean batch size
        self.recent: deque[int] = deque(maxlen=1000)  # the sizes of the latest batches
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, payload: Any) -> Future:
        """Queue one item; the future holds its result (or the batch's exception)."""
        if not self._thread.is_alive():
            raise RuntimeError("the micro-batcher is closed")
        item = _Item(payload, Future())
        self._queue.put(item)
        return item.future

    async def __call__(self, payload: Any) -> Any:
        """The result for one item, awaited without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(payload))

    def close(self, timeout: float | None = 10.0) -> None:
        """Finish the queued items, then stop the worker."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _work(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = first.arrived + self.max_wait_s
            while len(batch) < self.max_batch:
                try:  # what is already queued is taken without waiting, even past the deadline
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                batch.append(item)
            self._run(batch)

    def _run(self, batch: list[_Item]) -> None:
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        self.passes, self.images = self.passes + 1, self.images + len(live)
        self.recent.append(len(live))
        try:
            results = self.run_batch([item.payload for item in live])
            if len(results) != len(live):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} items")
        except Exception as exc:  # the requests fail, the worker lives on
            log.exception("a batch of %d failed", len(live))
            for item in live:
                item.future.set_exception(exc)
            return
        for item, result in zip(live, results, strict=True):
            item.future.set_result(result)
