"""Django's SQLite backend for a gateway under gunicorn, where SQLite is the default database and must not be the
slow path.

- **Connections are kept.** Each greenlet (or thread) of a worker has a Django connection of its own, so Django's
  ``CONN_MAX_AGE`` would keep none of them from one request to the next under gevent. Opening one per request cost
  more than the request's own statements, and closing the last one checkpointed and deleted the WAL every time
  (bench/RESULTS.md). Here a process keeps a bounded pool of open SQLite connections per database file: closing a
  Django connection gives its SQLite connection back, and connecting takes one (a new one only while fewer than
  ``OPTIONS["pool"]["max_size"]`` are open; beyond that a caller waits up to ``OPTIONS["pool"]["timeout"]`` seconds
  for one to come back).
- **Waiting for the write lock lets the worker go on.** SQLite's own wait for a lock another process holds sleeps
  inside the library, and under gevent that stops every request of the worker. Connections
  here wait in Python instead, in short steps that yield, up to the ``timeout`` option (``WaitingCursor``).
- **Checkpoints are not a request's job.** Once ``checkpoints_start()`` runs (every gunicorn worker calls it), the
  process's connections no longer checkpoint when a commit grows the WAL; a background thread does it every
  ``CHECKPOINT_EVERY_S``: first copying what it can beside the writers, then holding them off for the little that
  came meanwhile so that the WAL starts again from its beginning. Without that second step a WAL under steady load
  is never reset and grows without bound (bench/RESULTS.md).

An in-memory database is never pooled: each connection to one is a database of its own.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections
from django.db.backends.sqlite3 import base

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY_S, CHECKPOINT_WAIT_S = 1.0, 0.05
# A WAL that a burst grew past this is cut back to it when it starts again.
WAL_SIZE_LIMIT = 64 * 1024 * 1024
# A statement refused for a lock another connection holds is tried again after this long, growing to the maximum.
RETRY_FIRST_S, RETRY_MAX_S = 0.0001, 0.001


def _busy(error: sqlite3.Error) -> bool:
    return (getattr(error, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_BUSY


class WaitingCursor(base.SQLiteCursorWrapper):
    """Django's SQLite cursor, trying a statement again while another connection holds the lock it needs. Only outside
    a transaction: a statement refused there did nothing, and within one (begun IMMEDIATE, holding the write lock)
    there is nothing to wait for."""

    wait = 30.0  # seconds, at most, before "database is locked"

    def execute(self, query: str, params: Any = None) -> Any:
        return self._waiting(super().execute, query, params)

    def executemany(self, query: str, param_list: Any) -> Any:
        return self._waiting(super().executemany, query, param_list)

    def _waiting(self, run: Callable[[str, Any], Any], query: str, params: Any) -> Any:
        if self.connection.in_transaction:
            return run(query, params)
        deadline, delay = None, RETRY_FIRST_S
        while True:
            try:
                return run(query, params)
            except sqlite3.OperationalError as error:
                if not _busy(error):
                    raise
                now = time.monotonic()
                deadline = deadline or now + self.wait
                if now + delay > deadline:
                    raise
            time.sleep(delay)  # gevent's sleep in a gevent worker: the other requests go on
            delay = min(delay * 2, RETRY_MAX_S)


class ConnectionPool:
    """Open SQLite connections to one database file, at most ``size`` of them, most recently used first."""

    def __init__(self, *, size: int, timeout: float) -> None:
        self.size, self.timeout = size, timeout
        self._idle: list[sqlite3.Connection] = []
        # Created after gevent patched threading (the first connection is made in a worker), so waiting yields.
        self._slots = threading.BoundedSemaphore(size)

    def take(self, new: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
        """An idle connection, or ``new()`` while fewer than ``size`` are out. Raises ``OperationalError`` when none
        comes free within ``timeout`` seconds."""
        if not self._slots.acquire(timeout=self.timeout):
            raise OperationalError(f"no SQLite connection came free within {self.timeout:g} s "
                                   f"({self.size} are in use in this process)")
        try:
            return self._idle.pop() if self._idle else new()
        except BaseException:
            self._slots.release()
            raise

    def give(self, conn: sqlite3.Connection) -> None:
        """Take a connection back, rolled back to no transaction; one that cannot be is closed instead."""
        try:
            if conn.in_transaction:
                conn.rollback()
            self._idle.append(conn)
        except sqlite3.Error:
            conn.close()
        finally:
            self._slots.release()

    def forfeit(self) -> None:
        """A connection that was taken is gone without coming back (its holder was collected): free its place."""
        self._slots.release()

    def idle(self) -> list[sqlite3.Connection]:
        return list(self._idle)


_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()
_inherited: list[ConnectionPool] = []


def _forget_after_fork() -> None:
    # A child must not use its parent's SQLite connections, nor close them (closing one may checkpoint and delete the
    # parent's WAL): it keeps them referenced, unused, and starts pools of its own.
    _inherited.extend(_pools.values())
    _pools.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def pool_for(path: str, options: dict[str, Any]) -> ConnectionPool:
    pool = _pools.get(path)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(path)
            if pool is None:
                pool = _pools[path] = ConnectionPool(size=int(options.get("max_size", 16)),
                                                     timeout=float(options.get("timeout", 30)))
    return pool


# Whether this process checkpoints in the background (checkpoints_start): its connections then never do.
_background_checkpoints = False


def _owner_only(database: Any) -> None:
    """Keep the database file from other users (its WAL and shared-memory files take its mode)."""
    try:
        if isinstance(database, (str, os.PathLike)) and os.stat(database).st_mode & 0o077:
            os.chmod(database, 0o600)
    except OSError:  # an in-memory database, or a file this user does not own
        pass


class DatabaseWrapper(base.DatabaseWrapper):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lost: weakref.finalize[Any, Any] | None = None
        self._taken_from: ConnectionPool | None = None
        self.lock_wait = 5.0

    @property
    def pool(self) -> ConnectionPool | None:
        """This database's pool in this process (``None`` for an in-memory database, which is never pooled)."""
        if self.is_in_memory_db():
            return None
        return pool_for(self.settings_dict["NAME"], self.settings_dict["OPTIONS"].get("pool", {}))

    def get_connection_params(self) -> dict[str, Any]:
        params = super().get_connection_params()
        params.pop("pool", None)
        self.lock_wait = float(params.get("timeout", 5.0))
        params["timeout"] = 0  # SQLite must not wait itself: WaitingCursor does
        return params

    def create_cursor(self, name: str | None = None) -> WaitingCursor:
        cursor: WaitingCursor = self.connection.cursor(factory=WaitingCursor)
        cursor.wait = self.lock_wait
        return cursor

    def get_new_connection(self, conn_params: dict[str, Any]) -> sqlite3.Connection:
        pool = self.pool
        if pool is None:
            conn = super().get_new_connection(conn_params)
            _owner_only(conn_params.get("database"))
            return conn  # type: ignore[no-any-return]
        conn = pool.take(lambda: self._open(conn_params))
        # A greenlet or thread that ends without closing its connection must not keep a place in the pool forever.
        self._lost, self._taken_from = weakref.finalize(self, pool.forfeit), pool
        return conn

    def _open(self, conn_params: dict[str, Any]) -> sqlite3.Connection:
        conn: sqlite3.Connection = super().get_new_connection(conn_params)
        _owner_only(conn_params.get("database"))
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        if _background_checkpoints:
            conn.execute("PRAGMA wal_autocheckpoint = 0")
        return conn

    def _close(self) -> None:
        pool = self._taken_from
        if self._lost is None or pool is None or self.connection is None:
            super()._close()  # type: ignore[misc]  # django-stubs leaves BaseDatabaseWrapper._close out
            return
        self._lost.detach()
        self._lost, self._taken_from = None, None
        conn, self.connection = self.connection, None  # it may serve another greenlet the moment it is back
        pool.give(conn)


def checkpoints_start() -> bool:
    """Checkpoint the default database's WAL in a background thread from now on, and stop this process's connections
    from doing it on commit; return whether the default database is a pooled SQLite file (nothing to do otherwise)."""
    global _background_checkpoints
    wrapper = connections[DEFAULT_DB_ALIAS]
    if not isinstance(wrapper, DatabaseWrapper) or wrapper.pool is None or _background_checkpoints:
        return False
    _background_checkpoints = True
    for conn in wrapper.pool.idle():
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    path = wrapper.settings_dict["NAME"]
    threading.Thread(target=_checkpoint_loop, args=(str(path),), name="openopen8-sqlite-checkpoints",
                     daemon=True).start()
    return True


def _checkpoint_loop(path: str) -> None:
    # Its own connection: the RESTART step may wait for readers and the writer lock (SQLite's own wait, in a thread
    # where it stops nothing), for at most CHECKPOINT_WAIT_S; short of it, it is tried again next time.
    conn = sqlite3.connect(path, timeout=CHECKPOINT_WAIT_S, check_same_thread=False, isolation_level=None)
    failing = False
    while True:
        time.sleep(CHECKPOINT_EVERY_S)
        try:
            _off_the_loop(lambda: _checkpoint(conn))
            failing = False
        except sqlite3.Error as error:
            if _busy(error):
                continue  # another worker's checkpoint is running: it does the work
            if not failing:
                logger.warning("SQLite checkpoint failed (%s); trying again", error)
            failing = True


def _checkpoint(conn: sqlite3.Connection) -> None:
    _blocked, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if frames > 0:
        conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()


def _off_the_loop(work: Callable[[], object]) -> object:
    """Run ``work`` where it holds up no request: under gevent in a native thread of the hub's pool (SQLite lets go
    of the GIL while it writes and syncs), elsewhere right here, in this thread of its own."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is not None and monkey.is_module_patched("threading"):
        import gevent  # type: ignore[import-untyped]

        return gevent.get_hub().threadpool.apply(work)
    return work()
