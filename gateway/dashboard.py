"""What the console's dashboard shows: traffic, spend and errors over a day, a week or a month, broken down by
model, channel, token and group; the channels failing now; the budgets nearest their end."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db.models import Count
from django.utils import timezone
from django.utils.translation import gettext_lazy as _

from channels.models import Channel
from gateway.models import ApiToken, Budgeted, FailedAuthentication, TokenGroup, UsageLog, from_micros
from gateway.rollup import HOUR, Totals, by_dimension, by_hour, raw_rows, unindexed, usage_rollup
from gateway.state import CircuitView, shared_state

# A view: how far back it looks, and the width of one point of its charts.
RANGES: dict[str, tuple[Any, timedelta, str]] = {
    "day": (_("Last 24 hours"), timedelta(days=1), "hour"),
    "week": (_("Last 7 days"), timedelta(days=7), "6hours"),
    "month": (_("Last 30 days"), timedelta(days=30), "day"),
}
BREAKDOWNS: dict[str, Any] = {"model": _("Model"), "channel": _("Channel"), "token": _("Token"),
                              "group": _("Group")}
RECENT = timedelta(hours=1)  # "failing now" counts errors of the last hour
NEAR_BUDGET = 10  # budgets listed, nearest their end first


@dataclass(frozen=True)
class Row:
    """One line of a breakdown."""

    key: object
    label: str
    totals: Totals

    @property
    def spend_usd(self) -> float:
        return float(from_micros(self.totals.cost_micros))


def window(range_name: str, now: datetime) -> tuple[datetime, datetime]:
    """The view's first hour (whole hours, so every total read is a whole one) and now."""
    span = RANGES[range_name][1]
    start = int((now - span).timestamp()) // HOUR * HOUR + HOUR
    return datetime.fromtimestamp(start, UTC), now


def _bucket(hour: int, width: str) -> datetime:
    """The start, in the console's time zone, of the point an hour belongs to."""
    local = timezone.localtime(datetime.fromtimestamp(hour, UTC))
    if width == "day":
        return local.replace(hour=0)
    if width == "6hours":
        return local.replace(hour=local.hour - local.hour % 6)
    return local


def series(range_name: str, now: datetime) -> list[tuple[datetime, Totals]]:
    """Totals per point of the chart, every point present (an idle one is zero)."""
    start, _now = window(range_name, now)
    width = RANGES[range_name][2]
    points: dict[datetime, Totals] = {}
    for hour in range(int(start.timestamp()), int(now.timestamp()) + 1, HOUR):
        points.setdefault(_bucket(hour, width), Totals())
    for hour, totals in by_hour(start, now).items():
        at = _bucket(hour, width)
        points[at] = points.get(at, Totals()) + totals
    return sorted(points.items())


def _labels(breakdown: str, keys: list[Any]) -> dict[Any, str]:
    ids = [k for k in keys if k is not None]
    if breakdown == "channel":
        names = {c.pk: f"{c.name}{' (demo)' if c.demo else ''}" for c in Channel.objects.filter(pk__in=ids)}
        return {k: names.get(k, str(_("deleted channel #%(id)s") % {"id": k})) for k in ids} | {
            None: str(_("(no channel answered)"))}
    if breakdown == "token":
        tokens = {t.pk: str(t) for t in ApiToken.objects.filter(pk__in=ids)}
        return {k: tokens.get(k, f"#{k}") for k in ids} | {None: str(_("(no token)"))}
    if breakdown == "group":
        groups = dict(TokenGroup.objects.filter(pk__in=ids).values_list("pk", "name"))
        return {k: groups.get(k, f"#{k}") for k in ids} | {None: str(_("(no group)"))}
    return {k: str(k) or str(_("(no model)")) for k in keys}


def breakdown(name: str, range_name: str, now: datetime) -> list[Row]:
    """Totals by model, channel, token or group, the largest spend (then the most requests) first."""
    dimension = {"model": "model", "channel": "channel_id", "token": "token_id", "group": "group_id"}[name]
    start, _now = window(range_name, now)
    totals = by_dimension(dimension, start, now)
    labels = _labels(name, list(totals))
    rows = [Row(key, labels.get(key, str(key)), t) for key, t in totals.items()]
    return sorted(rows, key=lambda r: (-r.totals.cost_micros, -r.totals.requests, r.label))


@dataclass(frozen=True)
class Failing:
    channel: Channel
    reasons: list[str]
    recent_errors: int


def recent_errors(now: datetime) -> dict[int | None, int]:
    """Errors of the last hour by the channel that answered last (``None``: refused before any channel)."""
    return dict(raw_rows(now - RECENT).alias(state=unindexed("status")).filter(state=UsageLog.Status.ERROR)
                .values_list(unindexed("channel_id")).annotate(n=Count("id")))


def failing_channels(now: datetime, errors: dict[int | None, int]) -> list[Failing]:
    """Channels disabled by the gateway, with an open circuit, keys set aside, or errors in the last hour."""
    channels = list(Channel.objects.all())
    circuits = shared_state().circuits([c.pk for c in channels])
    clock = time.time()
    failing = []
    for channel in channels:
        reasons = []
        if not channel.enabled and channel.disabled_reason:
            reasons.append(str(_("disabled by the gateway: %(why)s") % {"why": channel.disabled_reason}))
        view = circuits.get(channel.pk, CircuitView())
        state = view.state(clock)
        if state == "open":
            reasons.append(str(_("circuit open for %(s)d s more") % {"s": int((view.open_until or 0) - clock)}))
        elif state == "half_open":
            reasons.append(str(_("circuit half-open: the next request probes")))
        if channel.disabled_keys:
            reasons.append(str(_("%(n)d of %(all)d keys set aside") % {"n": len(channel.disabled_keys),
                                                                       "all": len(channel.keys())}))
        if channel.last_error and channel.last_error_at and channel.last_error_at >= now - RECENT:
            reasons.append(str(_("last error: %(error)s") % {"error": channel.last_error}))
        recent = errors.get(channel.pk, 0)
        if reasons or recent:
            failing.append(Failing(channel, reasons, recent))
    return sorted(failing, key=lambda f: (-len(f.reasons), -f.recent_errors, f.channel.name))


@dataclass(frozen=True)
class Budget:
    kind: Any
    owner: Budgeted
    spent_micros: int
    budget_micros: int

    @property
    def used(self) -> float:
        return self.spent_micros / self.budget_micros if self.budget_micros else 1.0

    @property
    def spent_usd(self) -> str:
        return f"{from_micros(self.spent_micros):.2f}"

    @property
    def budget_usd(self) -> str:
        return f"{from_micros(self.budget_micros):.2f}"


def nearest_budgets(now: datetime, limit: int = NEAR_BUDGET) -> list[Budget]:
    """Tokens and groups with a budget, the largest share used first."""
    owners: list[tuple[Any, Budgeted]] = [
        *((_("token"), t) for t in ApiToken.objects.filter(enabled=True).exclude(budget_micros=None)),
        *((_("group"), g) for g in TokenGroup.objects.exclude(budget_micros=None))]
    budgets = [Budget(kind, owner, owner.spent_this_period(now), owner.budget_micros or 0) for kind, owner in owners]
    return sorted(budgets, key=lambda b: -b.used)[:limit]


def dashboard(range_name: str, now: datetime | None = None) -> dict[str, Any]:
    """Everything the page shows; the hours not yet added up are added up first."""
    now = now or timezone.now()
    usage_rollup(now)
    points = series(range_name, now)
    total = sum((t for _at, t in points), Totals())
    width = RANGES[range_name][2]
    fmt = "%m-%d" if width == "day" else "%m-%d %H:00"
    chart = {"labels": [at.strftime(fmt) for at, _t in points],
             "requests": [t.requests for _at, t in points],
             "errors": [t.errors for _at, t in points],
             "images": [t.images for _at, t in points],
             "spend": [float(from_micros(t.cost_micros)) for _at, t in points],
             "legend": {"requests": str(_("requests")), "errors": str(_("errors")), "images": str(_("images")),
                        "spend": str(_("spend (USD)"))}}
    breakdowns = {name: breakdown(name, range_name, now) for name in BREAKDOWNS}
    for name, rows in breakdowns.items():
        top = rows[:8]
        chart[f"by_{name}"] = {"labels": [r.label for r in top], "spend": [r.spend_usd for r in top],
                               "requests": [r.totals.requests for r in top]}
    errors = recent_errors(now)
    return {"range": range_name, "ranges": {k: v[0] for k, v in RANGES.items()}, "total": total,
            "spend_usd": f"{from_micros(total.cost_micros):.2f}", "error_rate": total.error_percent,
            "chart": chart, "breakdowns": [(name, BREAKDOWNS[name], rows) for name, rows in breakdowns.items()],
            "failing": failing_channels(now, errors), "budgets": nearest_budgets(now),
            "recent_errors": sum(errors.values()),
            "refused_keys": FailedAuthentication.objects.filter(last_at__gte=now - RECENT).count()}
