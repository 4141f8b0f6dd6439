"""Writing completed usage rows after the answer has gone, by a few writer threads (greenlets under gevent) per
process, and retrying a completion while the database is away."""

from __future__ import annotations

import logging
import queue
import threading
import time

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connection, connections

from gateway.journal import Completion, journal_park
from gateway.models import UsageLog
from gateway.usage_sql import usage_finish, usage_finish_many

logger = logging.getLogger("gateway.usage")  # every message about usage rows under one name

# The most completed rows a usage writer writes in one statement.
BATCH_MAX = 100
# A completion's first retry waits this long, doubling up to the maximum (seconds); after PARK_AFTER_S of failed
# tries it goes to the journal, which writes it once the database is back.
RETRY_FIRST_S, RETRY_MAX_S, PARK_AFTER_S = 0.05, 0.5, 1.0


def usage_finish_retrying(log: UsageLog, *, held: int, until: float) -> str | None:
    """``usage_finish``, tried again while the database cannot be reached, until ``until`` (``time.monotonic()``);
    return ``None`` once the row is written, else the last error. Writing a completion is idempotent, so a try that
    failed after its commit may be repeated."""
    delay, tries = RETRY_FIRST_S, 0
    while True:
        try:
            usage_finish(log, held=held)
            if tries:
                logger.warning("usage row of request %s written after %d retries", log.request_id, tries)
            return None
        except (OperationalError, InterfaceError) as error:
            _close_connection()  # a broken connection goes; the next try takes another
            if time.monotonic() + delay > until:
                return f"{type(error).__name__}: {str(error)[:200]}"
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


def usage_write(log: UsageLog, *, held: int) -> None:
    """Write the completed row now, tried again for a moment if the database is away, else kept in the journal;
    a row the database refuses outright is logged and left pending for the sweeper."""
    try:
        error = usage_finish_retrying(log, held=held, until=time.monotonic() + PARK_AFTER_S)
    except Exception:
        logger.exception("usage row of request %s refused by the database; the sweeper will fail it",
                         log.request_id)
        return
    if error is not None:
        journal_park([(log, held)], error)


IDLE_S = 1.0  # a writer keeps its database connection while rows keep coming, and gives it back after this long


class UsageWriters:
    """A few threads (greenlets under gevent) that write completed rows handed to them, so that the answer does not
    wait for the commit: on PostgreSQL a durable commit waits for the disk (bench/RESULTS.md).

    What a request owes is already safe before its answer goes: the budget hold is committed durably before any
    provider is called, and the completion only gives back what was not delivered. A row the database does not take
    within a second goes to the journal (``journal.py``), on disk; a worker that stops gracefully writes what it
    holds, and parks in the journal what it could not write in time (``drain``). When ``backlog`` rows wait
    already, a request writes its own.

    A writer takes every row that waits (up to ``BATCH_MAX``) and writes those without a refund in one statement and
    one commit: a burst of answers costs one round trip and one flush instead of one each.
    """

    def __init__(self, *, count: int = 4, backlog: int = 1000) -> None:
        self._queue: queue.Queue[Completion] = queue.Queue(backlog)
        self._writing: dict[int, list[Completion]] = {}  # what each writer has taken and not yet written
        for number in range(count):
            threading.Thread(target=self._run, name=f"openopen8-usage-writer-{number}", daemon=True).start()

    def submit(self, log: UsageLog, held: int) -> bool:
        """Hand the row over; ``False`` when the backlog is full and the caller must write it."""
        try:
            self._queue.put_nowait((log, held))
        except queue.Full:
            return False
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the rows handed over to be written, then park in the journal what is
        still waiting or being written; return how many rows were parked."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        if not self._queue.unfinished_tasks:
            return 0
        left: list[Completion] = [item for items in list(self._writing.values()) for item in items]
        while True:
            try:
                left.append(self._queue.get_nowait())
            except queue.Empty:
                break
        # A row being written as this runs may also be written by its writer: writing one twice counts it once.
        journal_park(left, f"still unwritten after {timeout:g} s at shutdown")
        return len(left)

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
            me = threading.get_ident()
            self._writing[me] = items
            try:
                _write_completions(items)
            finally:
                del self._writing[me]
                for _item in items:
                    self._queue.task_done()


def _together(log: UsageLog, held: int) -> bool:
    """Whether the row can go in a batch: written pending, and its hold (if any) exactly its cost."""
    return not log._state.adding and (not held or held == log.cost_micros)


def _write_completions(items: list[Completion]) -> None:
    """Write completed rows handed over together: those written pending with nothing to refund in one statement,
    the rest (and all of them, should that statement fail) one by one."""
    together = [(log, held) for log, held in items if _together(log, held)]
    if len(together) > 1:
        try:
            usage_finish_many(together)
        except Exception:  # the database is away, or refuses one of the rows: each is written alone
            _close_connection()
        else:
            items = [(log, held) for log, held in items if not _together(log, held)]
    for log, held in items:
        usage_write(log, held=held)


_writers: UsageWriters | None = None


def usage_writers_start() -> None:
    """Start this process's usage writers (gunicorn's post_worker_init), when OPENOPEN8_WRITE_AFTER_ANSWER is on and
    the database is PostgreSQL: SQLite's commits hold the whole process, so there is nothing to overlap."""
    global _writers
    if _writers is None and settings.OPENOPEN8_WRITE_AFTER_ANSWER and connection.vendor == "postgresql":
        _writers = UsageWriters()


def usage_writers_drain(timeout: float) -> int:
    """Write what the usage writers still hold, for up to ``timeout`` seconds, then park the rest in the journal;
    return how many rows were parked."""
    return _writers.drain(timeout) if _writers is not None else 0


def usage_complete(log: UsageLog, *, held: int) -> None:
    """Write the completed row: by the usage writers where they run (after the answer has gone), else now; never
    raises for the database (the row goes to the journal)."""
    if _writers is None or not _writers.submit(log, held):
        usage_write(log, held=held)


