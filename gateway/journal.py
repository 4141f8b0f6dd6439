"""Completed usage rows the database could not take, kept on local disk until it can: an answered request is
billed whatever happens to the database or the worker after its answer.

Each process appends what it could not write to its own file under ``<data dir>/journal`` (one JSON line a row,
fsynced) and holds an exclusive ``flock`` on it while it lives. It writes those rows again itself once the database
answers (``journal_replay``, every second from ``runtime``); a file whose lock is free belongs to a process that is
gone, and any process of the node, or ``manage.py sweep``, writes its rows and removes it. Writing a completion is
idempotent (``usage_sql.usage_finish``), so a row written twice, by a replay and by its writer, counts once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connections, models
from django.utils.dateparse import parse_datetime

from gateway.models import UsageLog
from gateway.usage_sql import usage_finish

logger = logging.getLogger("gateway.usage")

Completion = tuple[UsageLog, int]  # the completed row and the budget hold its pending row took

_DATES = {f.attname for f in UsageLog._meta.concrete_fields if isinstance(f, models.DateTimeField)}
_FIELDS = [f.attname for f in UsageLog._meta.concrete_fields if not f.primary_key]


def journal_dir() -> Path:
    return Path(settings.DATA_DIR) / "journal"


def encode(log: UsageLog, held: int) -> bytes:
    row = {name: getattr(log, name) for name in _FIELDS}
    line = {"held": held, "pending_written": not log._state.adding, "row": row}
    return json.dumps(line, cls=DjangoJSONEncoder, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Completion:
    data = json.loads(line)
    row: dict[str, Any] = {name: (parse_datetime(value) if name in _DATES and value else value)
                           for name, value in data["row"].items() if name in _FIELDS}
    log = UsageLog(**row)
    log._state.adding = not data["pending_written"]
    return log, int(data["held"])


class _Own:
    """This process's file, opened (and locked) when the first row is parked, and the rows it holds."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.parked: dict[str, Completion] = {}
        self.path: Path | None = None
        self.fd: int | None = None

    def append(self, items: list[Completion]) -> Path:
        with self.lock:
            if self.fd is None:
                folder = journal_dir()
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.path = folder / f"{self.pid}-{uuid.uuid4().hex[:8]}.jsonl"
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.write(self.fd, b"".join(encode(log, held) for log, held in items))
            os.fsync(self.fd)
            for log, held in items:
                self.parked[log.request_id] = (log, held)
            assert self.path is not None
            return self.path

    def written(self, request_id: str) -> None:
        with self.lock:
            self.parked.pop(request_id, None)
            if not self.parked and self.fd is not None:
                os.ftruncate(self.fd, 0)  # everything it held is in the database: nothing to replay


_own: _Own | None = None
_own_lock = threading.Lock()


def _mine() -> _Own:
    global _own
    with _own_lock:
        if _own is None or _own.pid != os.getpid():
            _own = _Own()
        return _own


def journal_park(items: list[Completion], why: str) -> None:
    """Keep completions the database did not take on disk, fsynced, for ``journal_replay``."""
    if not items:
        return
    own = _mine()
    first = not own.parked
    path = own.append(items)
    if first:  # one line an outage, not one a row
        logger.error("usage rows not written (%s); kept in %s until the database answers", why, path)


def journal_parked() -> int:
    """How many rows this process keeps in its journal."""
    own = _own
    return len(own.parked) if own is not None and own.pid == os.getpid() else 0


class DatabaseAway(Exception):
    """The database did not answer: try again later."""


def _write(log: UsageLog, held: int) -> None:
    """Write one row; raises ``DatabaseAway`` when the database did not answer. A row the database refuses (it
    cannot take it however often it is tried) is logged and left pending, for the sweeper."""
    try:
        usage_finish(log, held=held)
    except (OperationalError, InterfaceError) as error:
        try:
            connections[DEFAULT_DB_ALIAS].close()
        except Exception:  # a broken connection may fail to close; the next try takes another
            pass
        raise DatabaseAway(type(error).__name__) from error
    except Exception:
        logger.exception("usage row of request %s refused by the database; left for the sweeper", log.request_id)


def journal_replay() -> int:
    """Write what this process parked, then the rows of files whose process is gone; return how many rows this
    process still holds (at least 1 while the database is away; 0 when everything it could reach is written).
    Stops at the first sign that the database is still away."""
    written, away = 0, False
    own = _own if _own is not None and _own.pid == os.getpid() else None
    try:
        for request_id, (log, held) in list(own.parked.items()) if own is not None else []:
            _write(log, held)
            own.written(request_id)  # type: ignore[union-attr]
            written += 1
        for path in _others():
            written += _replay_file(path)
    except DatabaseAway:
        away = True
    if written:
        logger.warning("%d usage row(s) written from the journal", written)
    return max(journal_parked(), int(away))


def _replay_file(path: Path) -> int:
    """Write the rows of a gone process's file and remove it; 0 if another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:  # another process replayed it meanwhile
        return 0
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its process lives, or another replays it
            return 0
        with os.fdopen(os.dup(fd), "rb") as file:
            lines = file.read().splitlines()
        written = 0
        for number, line in enumerate(lines):
            try:
                log, held = decode(line)
            except (ValueError, KeyError, TypeError):  # a line cut short when its process was killed mid-write
                logger.error("journal %s line %d is not a usage row; skipped", path, number + 1)
                continue
            _write(log, held)
            written += 1
        path.unlink(missing_ok=True)
        return written
    finally:
        os.close(fd)


def _others() -> list[Path]:
    """The journal files of this node's other processes, living (locked) or gone."""
    own, folder = _own, journal_dir()
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.glob("*.jsonl") if own is None or path != own.path)


REPLAY_EVERY_S = 1.0


def _loop() -> None:
    while True:
        time.sleep(REPLAY_EVERY_S)
        try:
            if journal_parked() or _others():
                journal_replay()
        except Exception:
            logger.exception("journal replay failed; will try again")


def journal_start() -> None:
    """Replay this process's journal and its node's orphaned files every second, in a daemon thread (a greenlet
    under gevent)."""
    threading.Thread(target=_loop, name="openopen8-journal", daemon=True).start()
