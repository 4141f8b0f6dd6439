"""Writes that keep statistics (a channel's last use and last error, a token's last use, circuit counts) are best
effort: they never fail a request and never hold its answer. Under gunicorn one thread a process (a greenlet under
gevent) writes them from a bounded queue, dropping what does not fit; elsewhere (the test suite's client) they run
at once, their errors caught. Either way a database outage costs one log line, not one a request."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

logger = logging.getLogger(__name__)

BACKLOG = 1000
QUIET_S = 60.0  # after a failure was logged, further ones are counted, not logged, for this long

Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class _Writer:
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.queue: queue.Queue[Task] = queue.Queue(BACKLOG)
        threading.Thread(target=self._run, name="openopen8-bookkeeping", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                task = self.queue.get(timeout=1.0)
            except queue.Empty:
                _close()  # back to the pool while there is nothing to write
                task = self.queue.get()
            _guarded(task)


_writer: _Writer | None = None
_failures = {"last_logged": -QUIET_S, "since": 0, "dropped": 0}


def _close() -> None:
    try:
        connections[DEFAULT_DB_ALIAS].close()
    except Exception:  # a connection broken by an outage may fail to close
        pass


def _guarded(task: Task) -> None:
    fn, args, kwargs = task
    try:
        fn(*args, **kwargs)
    except Exception as error:
        _close()
        _failures["since"] += 1
        now = time.monotonic()
        if now - _failures["last_logged"] >= QUIET_S:
            logger.warning("bookkeeping write %s failed (%s: %s); %d failed since the last report", fn.__name__,
                           type(error).__name__, str(error)[:200], _failures["since"])
            _failures["last_logged"], _failures["since"] = now, 0


def bookkeeping_start() -> None:
    """Write bookkeeping in a thread of this process from now on (gunicorn workers)."""
    global _writer
    if _writer is None or _writer.pid != os.getpid():
        _writer = _Writer()


def best_effort(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Run ``fn(*args, **kwargs)`` off the request's path where the thread runs, else now; never raises."""
    writer = _writer
    if writer is None or writer.pid != os.getpid():
        _guarded((fn, args, kwargs))
        return
    try:
        writer.queue.put_nowait((fn, args, kwargs))
    except queue.Full:  # the database is slower than the traffic: statistics give way
        _failures["dropped"] += 1
