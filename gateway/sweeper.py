"""Clearing up after requests whose worker died: their pending usage rows are marked failed and their budget holds
refunded. Run by ``python manage.py sweep`` and, under gunicorn, by a thread in every worker.

A row is pending past its deadline either because its request never finished or because its completion could not
be written. The second kind is in a journal (``journal.py``): a sweep first writes what the node's journals hold,
and sweeps nothing while the database is away or has just come back (every process writes its journal within a
second of that; a sweeper waits for its next turn). A row swept all the same, because the node holding its journal
was down, is charged again when that journal is written."""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, transaction
from django.utils import timezone

from gateway.alerts import budget_alerts
from gateway.billing import budget_adjust
from gateway.journal import journal_replay
from gateway.models import Counter, Lease, UsageLog
from gateway.rollup import usage_rollup
from gateway.services import jobs_sweep
from gateway.usage_sql import ABANDONED

log = logging.getLogger(__name__)

def usage_sweep(*, grace: float | None = None) -> int:
    """Fail and refund pending rows older than the request deadline plus ``grace`` seconds (OPENOPEN8_SWEEP_GRACE
    unless given); return how many.

    Each row is claimed by one conditional UPDATE, so sweepers on several workers or nodes never refund twice.
    """
    if journal_replay():
        return 0  # the database is away: nothing can be told apart yet
    grace = settings.OPENOPEN8_SWEEP_GRACE if grace is None else grace
    cutoff = timezone.now() - timedelta(seconds=settings.OPENOPEN8_REQUEST_DEADLINE + grace)
    swept = 0
    # A job's row stays pending while the job waits in the queue: jobs are swept by their heartbeats (jobs_sweep).
    stale = UsageLog.objects.filter(status=UsageLog.Status.PENDING, created_at__lt=cutoff, job_id="")
    held_by = ("token_id", "group_id", "budget_period", "group_period")
    for pk, held, *budgets in stale.values_list("pk", "reserved_micros", *held_by):
        with transaction.atomic():
            claimed = UsageLog.objects.filter(pk=pk, status=UsageLog.Status.PENDING).update(
                status=UsageLog.Status.ERROR, error_type="server_error", error_code=ABANDONED,
                error_message="The request never finished (its worker stopped); the hold was refunded.",
                reserved_micros=0, completed_at=timezone.now())
            if claimed:
                budget_adjust(UsageLog(**dict(zip(held_by, budgets, strict=True))), micros=-held)
        swept += claimed
    # Shared state kept in the database: leases of dead workers and counter windows long closed.
    Lease.objects.filter(expires_at__lt=time.time()).delete()
    Counter.objects.filter(window__gt=0, window__lt=time.time() - 3600).delete()
    return swept


def _loop(interval: float) -> None:
    reached = False  # whether the previous turn reached the database: the first turn after an outage only looks
    while True:
        time.sleep(interval * random.uniform(0.8, 1.2))  # spread the workers' sweeps apart
        try:
            close_old_connections()
            if not reached:
                UsageLog.objects.exists()
                reached = True
                continue
            swept = usage_sweep()
            if swept:
                log.warning("swept %d abandoned request(s) and refunded their holds", swept)
            taken = jobs_sweep()
            if taken:
                log.warning("took over %d image job(s) whose runner stopped", taken)
            usage_rollup(timezone.now())  # the dashboard's hourly totals, kept current off its page
            budget_alerts()
        except (OperationalError, InterfaceError) as error:
            if reached:
                log.warning("sweep skipped: the database did not answer (%s)", type(error).__name__)
            reached = False
        except Exception:
            reached = False
            log.exception("sweep failed; will try again")
        finally:
            try:
                close_old_connections()
            except Exception:  # a connection broken by the outage may fail to close
                pass


def start_sweeper() -> None:
    """Sweep every OPENOPEN8_SWEEP_INTERVAL seconds in a daemon thread of this process."""
    threading.Thread(target=_loop, args=(settings.OPENOPEN8_SWEEP_INTERVAL,), name="openopen8-sweeper",
                     daemon=True).start()
