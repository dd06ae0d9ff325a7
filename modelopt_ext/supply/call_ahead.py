"""Fetch the next batches' supervision while the current step trains (sources called on the collated batch).

A remote source (`data.mode: remote`, serve_target) is called with the collated batch. Called inside the
step, nothing overlaps: a step takes fetch + compute, so with supply equal to demand a rank runs at half speed
(docs/scaling.md). `CallAhead` runs the source in one background thread, `depth` batches ahead of the
trainer (`data.call_ahead`), so the fetch of batch i+1 overlaps the compute of batch i.

What stays exact: the batches come from the same DataLoader in the same order, and the source is a pure
function of the batch, so the supervision is the same; the trainer still counts a batch as consumed only
when it trains it, so a checkpoint's data position (and so resume) is unchanged. Cost: `depth` batches of
supervision held in memory (on the trainer's device) ahead of the step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

log = logging.getLogger("modelopt_ext.supply.call_ahead")

_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class CallAhead:
    """Iterate `(batch, supervision, call_s, url)` for each batch of `batches`, the source called ahead.

    `prepare(batch)` runs first (e.g. the move to the device), `source(batch)` after it, both in the
    background thread; `call_s` is the source's own time (the server's latency) and `url` the server that
    answered (the source's `url` attribute right after the call, or None). An exception of the loader or the
    source is raised in the caller at the batch where it happened. Leaving the loop early (a stop, the last
    step) stops the thread; a fetch in flight is abandoned after `join_s` (its result is never used).
    """

    def __init__(
        self,
        batches: Iterable[Any],
        source: Callable[[Any], Any],
        *,
        prepare: Callable[[Any], Any] = lambda b: b,
        depth: int = 1,
        join_s: float = 10.0,
    ):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.batches, self.source, self.prepare = batches, source, prepare
        self.depth, self.join_s = depth, join_s

    def __iter__(self) -> Iterator[tuple[Any, Any, float, str | None]]:
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for batch in self.batches:
                    if stop.is_set():
                        return
                    batch = self.prepare(batch)
                    t = time.perf_counter()
                    sup = self.source(batch)
                    item = (batch, sup, time.perf_counter() - t, getattr(self.source, "url", None))
                    if not put(item):
                        return
                put(_END)
            except BaseException as e:  # handed to the trainer's thread, raised there
                put(_Failed(e))

        thread = threading.Thread(target=work, name="supervision-call-ahead", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            while True:  # unblock a put() in progress
                try:
                    q.get_nowait()
                except queue.Empty:
                    break
            thread.join(self.join_s)
            if thread.is_alive():
                log.warning(
                    "the supervision fetch in flight did not end within %.0fs of the loop's end; abandoned",
                    self.join_s,
                )
