"""The runner of image jobs in a process: one thread claims ready tasks from django-tasks-db (its own claim: a locked
row, ``SKIP LOCKED`` on PostgreSQL, an exclusive transaction on SQLite) while fewer than OPENOPEN8_JOB_CONCURRENCY
run, and each runs in a thread of its own through the library's worker (greenlets under gunicorn's gevent). Serving
processes start one (``openopen8/runtime.py``, unless OPENOPEN8_RUN_JOBS is off); ``manage.py jobworker`` runs one in
the foreground, on any node.

One poller a process, however many jobs it runs, keeps an idle gateway to one query every OPENOPEN8_JOB_POLL
seconds; a job submitted to this process wakes it at once."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, DatabaseError, close_old_connections, connections
from django_tasks_db.management.commands.db_worker import Worker
from django_tasks_db.models import DBTaskResult
from django_tasks_db.utils import exclusive_transaction

logger = logging.getLogger(__name__)

QUIET_S = 60.0  # a runner that cannot reach its database says so once a minute


class JobRunner:
    def __init__(self, *, concurrency: int, poll: float) -> None:
        self.concurrency, self.poll = concurrency, poll
        self.worker_id = f"{os.uname().nodename[:20]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._worker = Worker(queue_names=["default"], interval=poll, batch=False, backend_name="default",
                              startup_delay=False, max_tasks=None, worker_id=self.worker_id, excluded_queue_names=[])
        self._slots = threading.BoundedSemaphore(concurrency)
        self._wake, self._running = threading.Event(), 0
        self._lock = threading.Lock()
        self._stopping = False
        self._complained = 0.0

    def start(self) -> JobRunner:
        threading.Thread(target=self._loop, name="job runner", daemon=True).start()
        return self

    def nudge(self) -> None:
        self._wake.set()

    def stop(self, *, timeout: float) -> int:
        """Claim nothing more and wait up to ``timeout`` seconds for the jobs running; return how many still run
        (their jobs are picked up again, or failed and refunded, by a sweeper once their heartbeat stops)."""
        self._stopping = True
        self._wake.set()
        until = time.monotonic() + timeout
        while self.running() and time.monotonic() < until:
            time.sleep(0.05)
        return self.running()

    def running(self) -> int:
        with self._lock:
            return self._running

    def _loop(self) -> None:
        while not self._stopping:
            self._slots.acquire()
            task = self._claim()
            if task is None:
                self._slots.release()
                self._wake.wait(self.poll)
                self._wake.clear()
                continue
            with self._lock:
                self._running += 1
            threading.Thread(target=self._run, args=(task,), name=f"task {task.id}", daemon=True).start()

    def _claim(self) -> DBTaskResult[..., Any] | None:
        try:
            close_old_connections()
            tasks = DBTaskResult.objects.ready().filter(backend_name="default", queue_name="default")
            with exclusive_transaction(tasks.db):
                task = tasks.get_locked()
                if task is not None:
                    task.claim(self.worker_id)
            return task
        except DatabaseError as error:
            if time.monotonic() - self._complained > QUIET_S:
                self._complained = time.monotonic()
                logger.warning("the job runner cannot claim tasks (%s); it tries again", type(error).__name__)
            return None
        finally:
            connections[DEFAULT_DB_ALIAS].close()

    def _run(self, task: DBTaskResult[..., Any]) -> None:
        try:
            self._worker.run_task(task)
        finally:
            connections[DEFAULT_DB_ALIAS].close()
            with self._lock:
                self._running -= 1
            self._slots.release()


_runner: JobRunner | None = None


def runner_start() -> JobRunner:
    """Start this process's runner (once)."""
    global _runner
    if _runner is None:
        _runner = JobRunner(concurrency=settings.OPENOPEN8_JOB_CONCURRENCY, poll=settings.OPENOPEN8_JOB_POLL).start()
    return _runner


def runner_stop(*, timeout: float) -> None:
    global _runner
    if _runner is not None:
        left = _runner.stop(timeout=timeout)
        if left:
            logger.warning("stopping with %d image job(s) still running; a sweeper takes them over", left)
        _runner = None


def runner_nudge() -> None:
    """A job was submitted here: the runner of this process looks for it now rather than at its next poll."""
    if _runner is not None:
        _runner.nudge()
