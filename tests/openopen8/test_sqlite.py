"""The SQLite backend of the embedded default: connections kept in a bounded pool, writers that wait for the lock
without stopping a gevent worker, and checkpoints that keep the WAL from growing while writes go on."""

from __future__ import annotations

import gc
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.db import OperationalError
from django.db.utils import ConnectionHandler

from openopen8.sqlite.base import DatabaseWrapper, _checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def database_access(django_db_blocker: Any) -> Any:
    """These tests open databases of their own, in files of their own, beside the test database."""
    with django_db_blocker.unblock():
        yield


def connections_to(path: Path, *, size: int = 2, timeout: float = 0.3, lock_wait: float = 5.0) -> ConnectionHandler:
    return ConnectionHandler({"default": {
        "ENGINE": "openopen8.sqlite", "NAME": str(path), "CONN_MAX_AGE": 0,
        "OPTIONS": {"timeout": lock_wait, "transaction_mode": "IMMEDIATE",
                    "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
                    "pool": {"max_size": size, "timeout": timeout}}}})


def wrapper(handler: ConnectionHandler) -> DatabaseWrapper:
    """A Django connection of its own, as each greenlet or thread of a worker has."""
    made = handler.create_connection("default")
    assert isinstance(made, DatabaseWrapper)
    return made


def with_table(handler: ConnectionHandler) -> DatabaseWrapper:
    """A connection to a database in which it made the table ``t``."""
    made = wrapper(handler)
    with made.cursor() as cursor:
        cursor.execute("CREATE TABLE t (x INTEGER)")
    return made


def test_a_closed_connection_is_kept_open_for_the_next_request_and_the_wal_stays(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3")
    first = with_table(handler)
    with first.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES (1)")
    kept = first.connection
    first.close()
    # Plain SQLite checkpoints and deletes the WAL when its last connection closes; a kept one leaves it in place.
    assert (tmp_path / "db.sqlite3-wal").exists()
    second = wrapper(handler)
    second.ensure_connection()
    assert second.connection is kept
    with second.cursor() as cursor:
        cursor.execute("SELECT x FROM t")
        assert cursor.fetchall() == [(1,)]
    second.close()


def test_at_most_max_size_are_open_and_one_more_waits_its_turn_or_is_refused(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3", size=2, timeout=0.3)
    holders = [wrapper(handler), wrapper(handler)]
    for holder in holders:
        holder.ensure_connection()
    assert holders[0].connection is not holders[1].connection
    late = wrapper(handler)
    with pytest.raises(OperationalError, match="no SQLite connection came free within 0.3 s"):
        late.ensure_connection()
    # A place freed while it waits is taken at once.
    holders[0].inc_thread_sharing()
    threading.Timer(0.1, holders[0].close).start()
    late.ensure_connection()
    assert late.connection is not None
    late.close()
    holders[1].close()


def test_a_connection_whose_holder_went_away_without_closing_frees_its_place(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3", size=1, timeout=0.3)
    gone = wrapper(handler)
    gone.ensure_connection()
    del gone  # a greenlet that ended without closing its connection
    gc.collect()
    survivor = wrapper(handler)
    survivor.ensure_connection()
    survivor.close()


def test_a_connection_given_back_in_a_transaction_comes_back_rolled_back(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3", size=1)
    first = with_table(handler)
    first.connection.execute("BEGIN IMMEDIATE")
    first.connection.execute("INSERT INTO t VALUES (1)")
    first.close()
    second = wrapper(handler)
    with second.cursor() as cursor:
        assert not second.connection.in_transaction
        cursor.execute("SELECT count(*) FROM t")
        assert cursor.fetchone() == (0,)
        cursor.execute("INSERT INTO t VALUES (2)")  # and the write lock is free
    second.close()


def hold_write_lock(path: Path, seconds: float) -> threading.Thread:
    """Another connection (another worker, say) holding the write lock for ``seconds``."""
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO t VALUES (0)")

    def release() -> None:
        time.sleep(seconds)
        holder.execute("COMMIT")
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def test_a_write_waits_for_the_lock_another_connection_holds_then_goes_through(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3", lock_wait=5.0)
    writer = with_table(handler)
    released = hold_write_lock(tmp_path / "db.sqlite3", 0.3)
    with writer.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES (1)")  # waits about 0.3 s
        cursor.execute("SELECT count(*) FROM t")
        assert cursor.fetchone() == (2,)
    released.join()
    writer.close()


def test_a_write_still_locked_out_after_the_timeout_option_is_refused(tmp_path: Path) -> None:
    handler = connections_to(tmp_path / "db.sqlite3", lock_wait=0.2)
    writer = with_table(handler)
    released = hold_write_lock(tmp_path / "db.sqlite3", 1.0)
    started = time.monotonic()
    with pytest.raises(OperationalError, match="database is locked"), writer.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES (1)")
    assert time.monotonic() - started < 0.9
    released.join()
    writer.close()


GEVENT_WAIT = """
from gevent import monkey
monkey.patch_all()
import sys, time, gevent
sys.path.insert(0, {root!r})
from django.db.utils import ConnectionHandler
handler = ConnectionHandler({{"default": {{"ENGINE": {engine!r}, "NAME": {path!r}, "CONN_MAX_AGE": 0,
                                         "OPTIONS": {{"timeout": 5}}}}}})
ticks = []

def other_requests():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

conn = handler["default"]
conn.ensure_connection()
print("writing", flush=True)
gevent.spawn(other_requests)
gevent.sleep(0)
with conn.cursor() as cursor:
    cursor.execute("INSERT INTO t VALUES (1)")
print(len(ticks))
"""


def ticks_while_waiting_for_the_lock(tmp_path: Path, engine: str) -> int:
    """How often another greenlet of a gevent worker ran while a write waited 0.5 s for the lock."""
    tmp_path.mkdir()
    path = tmp_path / "db.sqlite3"
    sqlite3.connect(path, isolation_level=None).execute("CREATE TABLE t (x INTEGER)")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(GEVENT_WAIT.format(
        root=str(ROOT), engine=engine, path=str(path)))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "writing"  # the lock is held from here for 0.5 s
        time.sleep(0.5)
        holder.execute("COMMIT")
        out, err = process.communicate(timeout=30)
    finally:
        holder.close()
        process.kill()
    assert process.returncode == 0, err[-2000:]
    return int(out.strip())


def test_under_gevent_the_other_requests_go_on_while_a_write_waits_for_the_lock(tmp_path: Path) -> None:
    # Django's own backend waits inside SQLite, and the whole worker stops; this one waits in steps that yield.
    assert ticks_while_waiting_for_the_lock(tmp_path / "django", "django.db.backends.sqlite3") <= 2
    assert ticks_while_waiting_for_the_lock(tmp_path / "pooled", "openopen8.sqlite") >= 20


def test_the_background_checkpoint_starts_the_wal_again_while_readers_and_a_writer_go_on(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode=WAL")
    setup.execute("CREATE TABLE t (x BLOB)")
    stop = threading.Event()

    def writer() -> None:  # commits one after another, as requests make them
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        while not stop.is_set():
            conn.execute("INSERT INTO t VALUES (zeroblob(2000))")
            time.sleep(0.001)

    def reader() -> None:  # read transactions that overlap, so that some reader always holds an older snapshot
        conn = sqlite3.connect(path, isolation_level=None, timeout=5)
        while not stop.is_set():
            conn.execute("BEGIN")
            conn.execute("SELECT count(*) FROM t").fetchone()
            time.sleep(0.005)
            conn.execute("COMMIT")

    threads = [threading.Thread(target=work) for work in (writer, reader, reader)]
    for thread in threads:
        thread.start()
    try:
        checkpointer = sqlite3.connect(path, isolation_level=None, timeout=0.05, check_same_thread=False)
        salts = set()
        for _ in range(10):
            time.sleep(0.1)
            _checkpoint(checkpointer)
            time.sleep(0.05)  # the writer's next commit starts the WAL again, with a new salt in its header
            salts.add((tmp_path / "db.sqlite3-wal").read_bytes()[16:24])
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    # Copying alone (a PASSIVE checkpoint) would leave the WAL growing, with one salt, for as long as this went on.
    assert len(salts) >= 5, "the WAL was not started again"
