"""Clearing up after requests whose worker died: their pending usage rows are marked failed and their budget holds
refunded. Run by ``python manage.py sweep`` and, under gunicorn, by a thread in every worker."""

from __future__ import annotations

import logging
import random
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from gateway.billing import budget_settle
from gateway.models import Counter, Lease, UsageLog

log = logging.getLogger(__name__)

# How long past the request deadline a pending row is left before it counts as abandoned.
SWEEP_GRACE_S = 60.0


def usage_sweep(*, grace: float = SWEEP_GRACE_S) -> int:
    """Fail and refund pending rows older than the request deadline plus ``grace`` seconds; return how many.

    Each row is claimed by one conditional UPDATE, so sweepers on several workers or nodes never refund twice.
    """
    cutoff = timezone.now() - timedelta(seconds=settings.OPENOPEN8_REQUEST_DEADLINE + grace)
    swept = 0
    stale = UsageLog.objects.filter(status=UsageLog.Status.PENDING, created_at__lt=cutoff)
    for pk, token_id, held in stale.values_list("pk", "token_id", "reserved_micros"):
        with transaction.atomic():
            claimed = UsageLog.objects.filter(pk=pk, status=UsageLog.Status.PENDING).update(
                status=UsageLog.Status.ERROR, error_type="server_error", error_code="abandoned",
                error_message="The request never finished (its worker stopped); the hold was refunded.",
                reserved_micros=0, completed_at=timezone.now())
            if claimed and token_id is not None:
                budget_settle(token_id=token_id, micros=-held)
        swept += claimed
    # Shared state kept in the database: leases of dead workers and counter windows long closed.
    Lease.objects.filter(expires_at__lt=time.time()).delete()
    Counter.objects.filter(window__gt=0, window__lt=time.time() - 3600).delete()
    return swept


def _loop(interval: float) -> None:
    while True:
        time.sleep(interval * random.uniform(0.8, 1.2))  # spread the workers' sweeps apart
        try:
            close_old_connections()
            swept = usage_sweep()
            if swept:
                log.warning("swept %d abandoned request(s) and refunded their holds", swept)
        except Exception:
            log.exception("sweep failed; will try again")
        finally:
            close_old_connections()


def start_sweeper() -> None:
    """Sweep every OPENOPEN8_SWEEP_INTERVAL seconds in a daemon thread of this process."""
    threading.Thread(target=_loop, args=(settings.OPENOPEN8_SWEEP_INTERVAL,), name="openopen8-sweeper",
                     daemon=True).start()
