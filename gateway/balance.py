"""What a key may still spend and what it spent, in the shapes of OpenAI's legacy billing API
(``/v1/dashboard/billing/subscription`` and ``/usage``), as client front-ends read them from one-api and new-api."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from django.db.models import Sum
from django.db.models.functions import TruncDate

from gateway.models import ApiToken, UsageLog, from_micros
from openopen8.core.errors import InvalidRequest
from openopen8.core.schemas import JSONDict

# What an unlimited key reports as its limit, as one-api and new-api do.
SYSTEM_LIMIT_USD = 100_000_000.0
USAGE_DAYS_MAX = 100  # OpenAI's legacy endpoint refused longer ranges


def subscription(token: ApiToken) -> JSONDict:
    """The key's limit: the smaller of its own budget and its group's (per period, for renewing ones)."""
    budgets = [b.budget_micros for b in (token, token.group) if b is not None and b.budget_micros is not None]
    limit = float(from_micros(min(budgets))) if budgets else SYSTEM_LIMIT_USD
    until = int(token.expires_at.timestamp()) if token.expires_at else 0
    return {"object": "billing_subscription", "has_payment_method": True, "soft_limit_usd": limit,
            "hard_limit_usd": limit, "system_hard_limit_usd": limit, "access_until": until}


def _day(value: str | None, name: str, default: date) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"Invalid {name} '{value[:40]}': use YYYY-MM-DD.", param=name) from None


def usage(token: ApiToken, *, start_date: str | None, end_date: str | None, today: date) -> JSONDict:
    """What the key spent from ``start_date`` up to (not including) ``end_date``, UTC days: ``total_usage`` in
    cents and ``daily_costs`` by day and model. Defaults: the last 100 days, today included."""
    end = _day(end_date, "end_date", today + timedelta(days=1))
    earliest = end - timedelta(days=USAGE_DAYS_MAX) if end > date.min + timedelta(days=USAGE_DAYS_MAX) else date.min
    start = _day(start_date, "start_date", earliest)
    if start >= end or (end - start).days > USAGE_DAYS_MAX:
        raise InvalidRequest(f"start_date must come before end_date, at most {USAGE_DAYS_MAX} days apart.",
                             param="start_date")
    since = datetime.combine(start, datetime.min.time(), UTC)
    until = datetime.combine(end, datetime.min.time(), UTC)
    rows = (UsageLog.objects.filter(token=token, created_at__gte=since, created_at__lt=until, cost_micros__gt=0)
            .annotate(day=TruncDate("created_at", tzinfo=UTC)).values("day", "model")
            .annotate(micros=Sum("cost_micros")).order_by("day", "model"))
    days: dict[date, list[JSONDict]] = {}
    total = 0
    for row in rows:
        total += row["micros"]
        days.setdefault(row["day"], []).append({"name": row["model"], "cost": row["micros"] / 10_000})
    daily = [{"timestamp": int(datetime.combine(day, datetime.min.time(), UTC).timestamp()),
              "line_items": items} for day, items in days.items()]
    return {"object": "list", "total_usage": total / 10_000, "daily_costs": daily}
