from __future__ import annotations

import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from gateway.job_runner import JobRunner


class Command(BaseCommand):
    help = ("Run image jobs (Prefer: respond-async) in the foreground, on this node or any other sharing the database, "
            "until SIGTERM or SIGINT; then finish the jobs running, for up to --grace seconds.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--concurrency", type=int, default=settings.OPENOPEN8_JOB_CONCURRENCY,
                            help="jobs run at once (default: OPENOPEN8_JOB_CONCURRENCY)")
        parser.add_argument("--grace", type=float, default=30.0, help="seconds the running jobs get to finish")

    def handle(self, *args: Any, concurrency: int, grace: float, **opts: Any) -> None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        runner = JobRunner(concurrency=max(1, concurrency), poll=settings.OPENOPEN8_JOB_POLL).start()
        self.stdout.write(f"Running image jobs, {concurrency} at once (worker {runner.worker_id}).")
        self.stdout.flush()
        stop.wait()
        left = runner.stop(timeout=grace)
        self.stdout.write(f"Stopped; {left} job(s) were still running (a sweeper takes them over).")
