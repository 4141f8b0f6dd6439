"""Writing completed usage rows after the answer has gone, by a few writer threads (greenlets under gevent) per
process, and retrying a completion while the database is away."""

from __future__ import annotations

import logging
import queue
import threading
import time

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connection, connections

from gateway.models import UsageLog
from gateway.sweeper import SWEEP_GRACE_S
from gateway.usage_sql import Refund, usage_finish, usage_finish_many

logger = logging.getLogger("gateway.usage")  # every message about usage rows under one name

# The most completed rows a usage writer writes in one statement.
BATCH_MAX = 100
# A completion's first retry waits this long, doubling up to the maximum (seconds).
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0


def usage_finish_retrying(log: UsageLog, *, refund: Refund | None, until: float) -> bool:
    """``usage_finish``, tried again while the database cannot be reached, until ``until`` (``time.time()``); return
    whether the row was written. A try can fail after its commit (the answer lost on the way back), so each retry
    first looks whether the row is still to be written: pending, or not there at all."""
    delay, tries = RETRY_FIRST_S, 0
    while True:
        try:
            if tries == 0 or _unwritten(log):
                usage_finish(log, refund=refund)
            if tries:
                logger.warning("usage row of request %s written after %d retries", log.request_id, tries)
            return True
        except (OperationalError, InterfaceError) as error:
            _close_connection()  # a broken connection goes; the next try takes another
            if time.time() + delay > until:
                logger.error("usage row of request %s not written, database unreachable (%s); the sweeper will fail "
                             "it and refund its hold", log.request_id, type(error).__name__)
                return False
            if not tries:
                logger.warning("usage row of request %s not written (%s); trying again", log.request_id,
                               type(error).__name__)
        except Exception:
            logger.exception("usage row of request %s not written; the sweeper will fail it and refund its hold",
                             log.request_id)
            return False
        tries += 1
        time.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


def _close_connection() -> None:
    """Close this thread's database connection (back to the pool), whatever state it is in: a usage writer must
    outlive a failing database."""
    try:
        connections[DEFAULT_DB_ALIAS].close()
    except Exception:
        logger.exception("could not close a database connection")


def _unwritten(log: UsageLog) -> bool:
    status = UsageLog.objects.filter(request_id=log.request_id).values_list("status", flat=True).first()
    return status in (None, UsageLog.Status.PENDING)


IDLE_S = 1.0  # a writer keeps its database connection while rows keep coming, and gives it back after this long


class UsageWriters:
    """A few threads (greenlets under gevent) that write completed rows handed to them, so that the answer does not
    wait for the commit: on PostgreSQL a durable commit waits for the disk (bench/RESULTS.md).

    What a request owes is already safe before its answer goes: the budget hold is committed durably before any
    provider is called, and the completion only gives back what was not delivered. A database that goes away is
    retried until half the sweeper's grace is left; a worker killed before its rows are written leaves them pending
    for the sweeper, as a worker killed mid-request does, and one that stops gracefully writes them first
    (``drain``). When ``backlog`` rows wait already, a request writes its own.

    A writer takes every row that waits (up to ``BATCH_MAX``) and writes those without a refund in one statement and
    one commit: a burst of answers costs one round trip and one flush instead of one each.
    """

    def __init__(self, *, count: int = 4, backlog: int = 1000) -> None:
        self._queue: queue.Queue[tuple[UsageLog, Refund | None]] = queue.Queue(backlog)
        for number in range(count):
            threading.Thread(target=self._run, name=f"openopen8-usage-writer-{number}", daemon=True).start()

    def submit(self, log: UsageLog, refund: Refund | None) -> bool:
        """Hand the row over; ``False`` when the backlog is full and the caller must write it."""
        try:
            self._queue.put_nowait((log, refund))
        except queue.Full:
            return False
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the rows handed over to be written; return how many are left."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                _close_connection()  # back to the pool while there is nothing to write
                first = self._queue.get()
            items = [first]
            while len(items) < BATCH_MAX:  # what else waits goes with it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                _write_completions(items)
            finally:
                for _item in items:
                    self._queue.task_done()


def _write_completions(items: list[tuple[UsageLog, Refund | None]]) -> None:
    """Write completed rows handed over together: those written pending without a refund in one statement, the rest
    (and all of them, should that statement fail) one by one, each retried while the database is away."""
    together = [log for log, refund in items if refund is None and log.pk is not None]
    if len(together) > 1:
        try:
            usage_finish_many(together)
        except Exception:  # the database is away, or refuses one of the rows: each is written alone, and retried
            _close_connection()
        else:
            items = [(log, refund) for log, refund in items if refund is not None or log.pk is None]
    for log, refund in items:
        usage_finish_retrying(log, refund=refund, until=log.created_at.timestamp()
                              + settings.OPENOPEN8_REQUEST_DEADLINE + SWEEP_GRACE_S / 2)


_writers: UsageWriters | None = None


def usage_writers_start() -> None:
    """Start this process's usage writers (gunicorn's post_worker_init), when OPENOPEN8_WRITE_AFTER_ANSWER is on and
    the database is PostgreSQL: SQLite's commits hold the whole process, so there is nothing to overlap."""
    global _writers
    if _writers is None and settings.OPENOPEN8_WRITE_AFTER_ANSWER and connection.vendor == "postgresql":
        _writers = UsageWriters()


def usage_writers_drain(timeout: float) -> int:
    """Write what the usage writers still hold, for up to ``timeout`` seconds; return how many rows are left."""
    return _writers.drain(timeout) if _writers is not None else 0


def usage_complete(log: UsageLog, *, refund: Refund | None) -> None:
    """Write the completed row: by the usage writers where they run (after the answer has gone), else now."""
    if _writers is None or not _writers.submit(log, refund):
        usage_finish(log, refund=refund)


