"""What a serving process starts once it has loaded the app and stops before it exits, in one place.
``openopen8/wsgi.py`` calls ``start`` (and gunicorn's ``post_worker_init`` too, for a worker forked from a master that
preloaded the app); gunicorn's ``worker_exit`` calls ``stop``. A process that serves Django without ``wsgi.py`` (the
test suite's client and live servers) starts none of it: it reads the versions on every request, writes usage rows
before answering and leaves sweeping to ``manage.py sweep``."""

from __future__ import annotations

import os

_started_in: int | None = None  # the pid that started, so a fork starts its own


def start() -> None:
    """Start this process's background work: SQLite checkpoints, the sweeper, the usage writers, the versions
    subscription and the job runner. Once per process."""
    global _started_in
    if _started_in == os.getpid():
        return
    _started_in = os.getpid()
    from django.conf import settings

    from gateway.bookkeeping import bookkeeping_start
    from gateway.job_runner import runner_start
    from gateway.journal import journal_start
    from gateway.state import lease_renewal_start, shared_state
    from gateway.sweeper import start_sweeper
    from gateway.usage_writers import usage_writers_start
    from openopen8.sqlite.base import checkpoints_start

    checkpoints_start()  # on SQLite, checkpoints run in the background rather than in a request's commit
    start_sweeper()  # abandoned requests swept now and then; safe on many workers at once
    usage_writers_start()  # completed usage rows written after the answer has gone (OPENOPEN8_WRITE_AFTER_ANSWER)
    journal_start()  # rows the database did not take, written once it answers
    lease_renewal_start()  # places under concurrency limits renewed while their requests run
    bookkeeping_start()  # channel and token statistics written off the answer's path
    shared_state().listen()  # the versions kept current without a round trip a request (Redis)
    if settings.OPENOPEN8_RUN_JOBS:
        runner_start()  # image jobs (Prefer: respond-async) run here too, so the embedded default needs no worker


def stop(*, timeout: float) -> None:
    """Write the usage rows this process still holds, for up to ``timeout`` seconds; what is left stays in the
    journal on disk, for the next worker or ``manage.py sweep``, and is logged. Nothing to do in a process that never
    started."""
    if _started_in != os.getpid():
        return
    import logging

    from gateway.job_runner import runner_stop
    from gateway.journal import journal_parked, journal_replay
    from gateway.usage_writers import usage_writers_drain

    runner_stop(timeout=timeout)  # the jobs running finish and write their rows, or a sweeper takes them over
    usage_writers_drain(timeout=timeout)
    if journal_parked() and journal_replay():
        logging.getLogger("gateway.usage").error(
            "stopping with %d usage row(s) the database did not take; they stay in the journal for the next worker "
            "or `manage.py sweep`", journal_parked())
