"""The shared state in the database, for a gateway without Redis: counters and leases in their tables, circuits in
``channels.Circuit``, the two versions as counter rows."""

from __future__ import annotations

import time
import uuid
from functools import cache

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q

from channels.models import Circuit
from gateway.models import Counter, Lease
from gateway.state.base import Admission, CircuitView, LeaseAsk, Window, cooldown, new_version

# The names of the two version rows among the counters (window 0).
CONFIG, CIRCUITS = "config", "circuits"


class DatabaseState:
    def admit(self, *, window: Window | None, lease: LeaseAsk | None) -> Admission:
        # The lease first: it can be given back if the window then refuses, where a count could not be taken back.
        lease_id = None
        if lease is not None:
            lease_id = self._take(lease)
            if lease_id is None:
                return Admission("lease")
        if window is not None:
            wait = self._count(window)
            if wait is not None:
                if lease is not None and lease_id is not None:
                    self.release(lease.key, lease_id)
                return Admission("window", wait)
        return Admission(lease_id=lease_id)

    def _count(self, window: Window) -> float | None:
        """Count in the window; ``None`` when counted, else the seconds until it resets."""
        key, amount, limit, seconds = window
        now = time.time()
        start = int(now // seconds) * seconds
        wait = start + seconds - now
        for _ in range(3):
            if Counter.objects.filter(key=key, window=start, count__lte=limit - amount).update(
                    count=F("count") + amount):
                return None
            if amount > limit or Counter.objects.filter(key=key, window=start).exists():
                return wait
            try:
                with transaction.atomic():
                    Counter.objects.create(key=key, window=start, count=amount)
                return None
            except IntegrityError:  # another request created the window first: count in it
                continue
        return wait

    def _take(self, lease: LeaseAsk) -> str | None:
        """A place's id, or ``None`` when all are taken."""
        now, holder = time.time(), uuid.uuid4().hex
        Counter.objects.get_or_create(key=f"lock:{lease.key}", window=0)
        with transaction.atomic():
            # One lease decision per key at a time: a row lock on PostgreSQL; SQLite's write lock does the same.
            Counter.objects.select_for_update().get(key=f"lock:{lease.key}", window=0)
            Lease.objects.filter(key=lease.key, expires_at__lte=now).delete()
            if Lease.objects.filter(key=lease.key).count() >= lease.limit:
                return None
            Lease.objects.create(key=lease.key, holder=holder, expires_at=now + lease.ttl)
        return holder

    def release(self, key: str, lease_id: str) -> None:
        Lease.objects.filter(holder=lease_id).delete()

    def renew(self, leases: list[tuple[str, str]], ttl: float) -> None:
        Lease.objects.filter(holder__in=[lease_id for _key, lease_id in leases]).update(expires_at=time.time() + ttl)

    def circuits(self, channel_ids: list[int]) -> dict[int, CircuitView]:
        return {c.channel_id: CircuitView(c.failures, c.trips, c.open_until)
                for c in Circuit.objects.filter(channel_id__in=channel_ids)}

    def claim_probe(self, channel_id: int, *, ttl: float) -> bool:
        now = time.time()
        free = Q(probe_until__isnull=True) | Q(probe_until__lt=now)
        return bool(Circuit.objects.filter(free, channel_id=channel_id, open_until__lte=now)
                    .update(probe_until=now + ttl))

    # Every change to what a circuit looks like (a fault counted, a trip, a reset) moves the circuits version in the
    # same transaction, so a process may keep the circuits it read until that version moves (gateway/cache.py). A
    # claimed probe changes nothing a reader sees.
    def circuit_failed(self, channel_id: int) -> CircuitView:
        with transaction.atomic():
            circuit, _ = Circuit.objects.select_for_update().get_or_create(channel_id=channel_id)
            circuit.failures += 1
            if circuit.open_until is not None or circuit.failures >= settings.OPENOPEN8_BREAKER_THRESHOLD:
                circuit.trips += 1
                circuit.open_until = time.time() + cooldown(circuit.trips)
                circuit.failures, circuit.probe_until = 0, None
            circuit.save()
            _move_version(CIRCUITS)
        return CircuitView(circuit.failures, circuit.trips, circuit.open_until)

    def circuit_ok(self, channel_id: int) -> None:
        with transaction.atomic():
            deleted, _ = Circuit.objects.filter(channel_id=channel_id).delete()
            if deleted:
                _move_version(CIRCUITS)

    def versions(self) -> tuple[int, int]:
        # Every request sends it, so it is written once rather than built by the ORM each time (bench/RESULTS.md).
        with connection.cursor() as cursor:
            cursor.execute(_versions_sql(connection.vendor), [CONFIG, CIRCUITS])
            found = dict(cursor.fetchall())
        return found.get(CONFIG, 0), found.get(CIRCUITS, 0)

    def bump_config_version(self) -> None:
        _move_version(CONFIG)

    def listen(self) -> None:
        """Nothing to listen to: each request reads the versions in one statement."""

    def health(self) -> dict[str, str]:
        return {}


def _move_version(key: str) -> None:
    try:
        Counter.objects.update_or_create(key=key, window=0, defaults={"count": new_version()})
    except IntegrityError:  # another process created the row at the same moment
        Counter.objects.filter(key=key, window=0).update(count=new_version())


@cache
def _versions_sql(vendor: str) -> str:
    quote = connection.ops.quote_name  # the fields' names are their columns'; "window" is a word of SQL's own
    key, window, count = quote("key"), quote("window"), quote("count")
    return f"SELECT {key}, {count} FROM {quote(Counter._meta.db_table)} WHERE {window} = 0 AND {key} IN (%s, %s)"
