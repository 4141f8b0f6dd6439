"""Hourly totals of usage for the dashboard.

An hour is added up once it has ended and ``SETTLE`` seconds have passed (requests still finishing are written by
then); an hour that still had pending rows (image jobs, requests in flight) is added up again on every turn until it
has none. The dashboard reads the totals for settled hours and the usage rows themselves for the hour or so after;
the sweeper keeps the totals current, and the dashboard adds up whatever hours are missing before it reads, so it is
right without a sweeper too. Only the last ``KEEP_DAYS`` are added up: the dashboard's longest view is a month."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import Count, F, Func, Q, QuerySet, Sum
from django.db.models.functions import Coalesce, TruncHour

from gateway.models import RolledHour, UsageHour, UsageLog

HOUR = 3600
SETTLE = 300
KEEP_DAYS = 35
# At most this many hours are added up in one transaction, so a first backfill never holds the writer long, nor (on
# SQLite, whose calls do not yield to a gevent worker's other requests) the worker (bench/RESULTS.md).
CHUNK_HOURS = 6
_LOCK = zlib.crc32(b"openopen8-usage-rollup")

DIMENSIONS = ("model", "channel_id", "token_id", "group_id")
MEASURES = ("requests", "errors", "pending", "images", "cost_micros")
ALL = "all"  # the dimension of an hour's totals in all


def settled_until(now: datetime) -> int:
    """The end (Unix seconds) of the last hour whose totals are kept: later rows are read as they are."""
    return (int(now.timestamp()) - SETTLE) // HOUR * HOUR


def _raw_measures() -> dict[str, Count | Coalesce]:
    return {"requests": Count("id"),
            "errors": Count("id", filter=Q(status=UsageLog.Status.ERROR)),
            "pending": Count("id", filter=Q(status=UsageLog.Status.PENDING)),
            "images": Coalesce(Sum("images_returned"), 0),
            "cost_micros": Coalesce(Sum("cost_micros"), 0)}


def _hour_measures() -> dict[str, Coalesce]:
    return {name: Coalesce(Sum(name), 0) for name in MEASURES}


class Unindexed(Func):
    """A column as it is, written ``+column`` on SQLite: its planner would otherwise group a time range's rows by
    walking the grouping column's index over the whole table instead of reading the range by the time's index
    (bench/RESULTS.md)."""

    template = "%(expressions)s"

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        return self.as_sql(compiler, connection, template="+%(expressions)s", **extra)


def unindexed(name: str) -> Unindexed:
    return Unindexed(F(name))


def raw_rows(start: datetime, end: datetime | None = None) -> QuerySet[UsageLog]:
    rows = UsageLog.objects.filter(created_at__gte=start)
    return (rows.filter(created_at__lt=end) if end else rows).order_by()


def _contiguous(hours: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of hours as [start, end) ranges of at most CHUNK_HOURS."""
    runs: list[tuple[int, int]] = []
    for hour in sorted(hours):
        if runs and runs[-1][1] == hour and hour - runs[-1][0] < CHUNK_HOURS * HOUR:
            runs[-1] = (runs[-1][0], hour + HOUR)
        else:
            runs.append((hour, hour + HOUR))
    return runs


def usage_rollup(now: datetime) -> int:
    """Add up the hours of the last KEEP_DAYS that are settled and not yet (or not finally) added up; return how
    many hours were added up."""
    end = settled_until(now)
    start = end - KEEP_DAYS * 86400
    final = set(RolledHour.objects.filter(hour__gte=start, hour__lt=end, pending=0).values_list("hour", flat=True))
    todo = [hour for hour in range(start, end, HOUR) if hour not in final]
    for first, last in _contiguous(todo):
        _roll(first, last)
        time.sleep(0)  # let the process's other requests (greenlets or threads) run between chunks
    if todo:  # a new hour was added up: the one that left the kept days goes (no write on a turn that adds none)
        UsageHour.objects.filter(hour__lt=start).delete()
        RolledHour.objects.filter(hour__lt=start).delete()
    return len(todo)


def _roll(first: int, last: int) -> None:
    """Replace the totals of the hours [first, last) with the sum of their rows, in one transaction."""
    begin, end = datetime.fromtimestamp(first, UTC), datetime.fromtimestamp(last, UTC)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Two processes adding up the same hours would each insert their totals: one waits for the other.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK])
        UsageHour.objects.filter(hour__gte=first, hour__lt=last).delete()
        RolledHour.objects.filter(hour__gte=first, hour__lt=last).delete()
        hours = raw_rows(begin, end).annotate(at=TruncHour("created_at", tzinfo=UTC))
        pending: dict[int, int] = {}
        totals = []
        for group in hours.values("at").annotate(**_raw_measures()):
            hour, measures = int(group["at"].timestamp()), _measures(group)
            pending[hour] = measures["pending"]
            totals.append(UsageHour(hour=hour, dimension=ALL, **measures))
        for dimension in DIMENSIONS:
            for group in hours.values("at", by=unindexed(dimension)).annotate(**_raw_measures()):
                key = "" if group["by"] is None else str(group["by"])
                totals.append(UsageHour(hour=int(group["at"].timestamp()), dimension=dimension, key=key,
                                        **_measures(group)))
        UsageHour.objects.bulk_create(totals, batch_size=500)
        RolledHour.objects.bulk_create([RolledHour(hour=hour, pending=pending.get(hour, 0))
                                        for hour in range(first, last, HOUR)], batch_size=500)


@dataclass(frozen=True)
class Totals:
    requests: int = 0
    errors: int = 0
    pending: int = 0
    images: int = 0
    cost_micros: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.requests + other.requests, self.errors + other.errors, self.pending + other.pending,
                      self.images + other.images, self.cost_micros + other.cost_micros)

    @property
    def error_rate(self) -> float:
        ended = self.requests - self.pending
        return self.errors / ended if ended else 0.0

    @property
    def error_percent(self) -> str:
        return f"{self.error_rate:.1%}"


def _measures(row: Any) -> dict[str, int]:
    return {name: row[name] for name in MEASURES}


def _totals(row: Any) -> Totals:
    return Totals(**_measures(row))


def by_hour(start: datetime, now: datetime) -> dict[int, Totals]:
    """Totals of each hour from ``start`` (an hour's start) to now, by the hour's Unix start."""
    split = max(settled_until(now), int(start.timestamp()))
    hours: dict[int, Totals] = {}
    rolled = UsageHour.objects.filter(dimension=ALL, hour__gte=int(start.timestamp()), hour__lt=split)
    for row in rolled.values("hour", *MEASURES):
        hours[row["hour"]] = _totals(row)
    live = (raw_rows(datetime.fromtimestamp(split, UTC)).annotate(at=TruncHour("created_at", tzinfo=UTC))
            .values("at").annotate(**_raw_measures()))
    for live_row in live:
        hour = int(live_row["at"].timestamp())
        hours[hour] = hours.get(hour, Totals()) + _totals(live_row)
    return hours


def by_dimension(dimension: str, start: datetime, now: datetime) -> dict[object, Totals]:
    """Totals from ``start`` (an hour's start) to now by one of DIMENSIONS."""
    assert dimension in DIMENSIONS
    split = max(settled_until(now), int(start.timestamp()))
    totals: dict[object, Totals] = {}
    rolled = (UsageHour.objects.filter(dimension=dimension, hour__gte=int(start.timestamp()), hour__lt=split)
              .values("key").annotate(**_hour_measures()).order_by())
    for row in rolled:
        key: object = row["key"] if dimension == "model" else int(row["key"]) if row["key"] else None
        totals[key] = totals.get(key, Totals()) + _totals(row)
    live = raw_rows(datetime.fromtimestamp(split, UTC)).values(key=unindexed(dimension)).annotate(**_raw_measures())
    for row in live:
        totals[row["key"]] = totals.get(row["key"], Totals()) + _totals(row)
    return totals
