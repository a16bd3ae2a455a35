"""The one timer thread of a process: deferred calls (lease idle returns, retries, backoff).

    call_later(delay, fn) --heap--> timer thread --fn()--
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Timers:
    """A heap of (deadline, fn) served by one thread; start() and stop() own its lifetime."""

    def __init__(self, name: str = "rayx-timers"):
        self._heap: list = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Timers:
        self._thread.start()
        return self

    def call_later(self, delay: float, fn: Callable[[], object]) -> None:
        with self._cond:
            entry = (time.monotonic() + delay, next(self._seq), fn)
            heapq.heappush(self._heap, entry)
            if self._heap[0] is entry:  # a later deadline needs no wake-up: the thread sleeps
                self._cond.notify()      # until the earliest one anyway

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (
                        not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopped:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                log.exception("timer callback failed")

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
