"""Operator alerts: a channel the gateway disabled, a circuit that opened, a token or group past 80 % or 100 % of its
budget. Each is recorded once as an ``Alert`` (its key is unique: a budget's threshold is told once per period and
budget) and delivered by a task, off the request's path: POSTed as JSON to OPENOPEN8_ALERT_WEBHOOK_URL (with a
``text`` field, so chat webhooks show it as is) and mailed to OPENOPEN8_ALERT_EMAIL when an SMTP host is set.

Budgets are looked at by the sweeper (every OPENOPEN8_SWEEP_INTERVAL seconds), and at once when a request is refused
for its budget; channels and circuits as the gateway changes them.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from channels.models import Channel
from gateway.bookkeeping import best_effort
from gateway.models import Alert, ApiToken, Budgeted, TokenGroup, from_micros
from gateway.state.base import SharedState
from gateway.webhooks import signed_headers
from openopen8.core import http
from openopen8.core.errors import GatewayError, mask_secrets

logger = logging.getLogger(__name__)

THRESHOLDS = (100, 80)  # percent of a budget, highest first: a budget that jumps past both is told once


def _mail_configured() -> bool:
    return bool(settings.OPENOPEN8_ALERT_EMAIL and settings.EMAIL_HOST)


def alerts_configured() -> bool:
    return bool(settings.OPENOPEN8_ALERT_WEBHOOK_URL) or _mail_configured()


def alert_raise(key: str, kind: str, subject: str, text: str, data: dict[str, Any]) -> Alert | None:
    """Record the alert and have it delivered; ``None`` when one with this key was raised before."""
    try:
        with transaction.atomic():
            alert = Alert.objects.create(key=key, kind=kind, subject=subject[:200], text=text, data=data)
    except IntegrityError:
        return None
    logger.warning("alert: %s", subject)
    if alerts_configured():
        from gateway.tasks import alert_enqueue  # the tasks deliver through this module

        alert_enqueue(alert.pk)
    return alert


def _channel(channel_id: int) -> Channel | None:
    return Channel.objects.filter(pk=channel_id).first()


def channel_disabled_alert(channel_id: int) -> None:
    channel = _channel(channel_id)
    if channel is None or channel.enabled:
        return
    reason = mask_secrets(channel.disabled_reason, *channel.keys())
    alert_raise(f"channel.disabled:{channel_id}:{time.time_ns()}", Alert.Kind.CHANNEL_DISABLED,
                f"Channel {channel.name!r} was disabled",
                f"The gateway disabled channel {channel.name!r} (#{channel_id}): {reason} It serves nothing until an "
                "operator enables it again.",
                {"channel": {"id": channel_id, "name": channel.name}, "reason": reason})


def on_channel_disabled(sender: type[Channel], *, channel_id: int, **kwargs: Any) -> None:
    best_effort(channel_disabled_alert, channel_id)


def circuit_fault(state: SharedState, channel_id: int) -> None:
    """Count a channel's fault against its circuit; the fault that opens a closed circuit raises an alert (not the
    failed probes that keep it open)."""
    view = state.circuit_failed(channel_id)
    if view.trips != 1 or view.open_until is None:
        return
    channel = _channel(channel_id)
    name = channel.name if channel is not None else f"#{channel_id}"
    seconds = max(round(view.open_until - time.time()), 0)
    alert_raise(f"circuit.opened:{channel_id}:{int(view.open_until)}", Alert.Kind.CIRCUIT_OPENED,
                f"Circuit of channel {name!r} opened",
                f"Channel {name!r} (#{channel_id}) failed {settings.OPENOPEN8_BREAKER_THRESHOLD} times in a row: its "
                f"circuit is open and requests go to other channels; a probe tries it again in {seconds} s.",
                {"channel": {"id": channel_id, "name": name}, "open_until": view.open_until})


def _whose(row: Budgeted) -> tuple[str, dict[str, Any]]:
    if isinstance(row, ApiToken):
        return (f"API token {row.name!r} (sk-{row.key_prefix}…)",
                {"token": {"id": row.pk, "name": row.name, "key_prefix": f"sk-{row.key_prefix}"}})
    assert isinstance(row, TokenGroup)
    return f"Token group {row.name!r}", {"group": {"id": row.pk, "name": row.name}}


def _budget_alert(row: Budgeted, percent: int, *, refused: bool = False) -> Alert | None:
    assert row.budget_micros is not None
    period, spent = row.current_period(), row.spent_this_period()
    base = f"budget.threshold:{row._meta.model_name}:{row.pk}:{period}:{row.budget_micros}"
    # Told already, or past a higher threshold already: looked up first, so a sweep inserts nothing to be refused.
    if Alert.objects.filter(key__in=[f"{base}:{p}" for p in THRESHOLDS if p >= percent]).exists():
        return None
    whose, data = _whose(row)
    spent_usd, budget_usd = from_micros(spent), from_micros(row.budget_micros)
    renews = "" if not period else f" It renews {row.get_budget_period_display()}."
    what = ("was refused a request its budget's rest does not cover" if refused
            else f"has spent {percent} % of its budget")
    return alert_raise(f"{base}:{percent}", Alert.Kind.BUDGET, f"{whose} {what}",
                       f"{whose} {what}: ${spent_usd:.2f} of ${budget_usd:.2f}.{renews}",
                       {**data, "percent": percent, "spent_usd": f"{spent_usd:.6f}",
                        "budget_usd": f"{budget_usd:.6f}", "refused": refused})


def budget_alerts() -> int:
    """Raise the thresholds the budgets have crossed since they were last looked at; return how many were raised."""
    raised = 0
    for model in (ApiToken, TokenGroup):
        # 80 % and over, in integers on every database: spent * 5 >= budget * 4.
        rows = model.objects.filter(budget_micros__gt=0).alias(
            over=F("spent_micros") * 5 - F("budget_micros") * 4).filter(over__gte=0)
        for row in rows:
            assert row.budget_micros is not None
            spent = row.spent_this_period()
            for percent in THRESHOLDS:
                if spent * 100 >= row.budget_micros * percent:
                    raised += _budget_alert(row, percent) is not None
                    break
    return raised


def budget_refused(token_id: int, of: str) -> None:
    """A request of the token was refused because its budget (``of``: ``"token"``) or its group's does not cover
    it: that budget is at its end, whatever the percentage."""
    token = ApiToken.objects.select_related("group").filter(pk=token_id).first()
    row: Budgeted | None = token.group if token is not None and of == "group" else token
    if row is not None and row.budget_micros is not None:
        _budget_alert(row, THRESHOLDS[0], refused=True)


def alert_body(alert: Alert) -> bytes:
    return json.dumps({"id": f"alert_{alert.pk}", "type": alert.kind, "created_at": int(alert.created_at.timestamp()),
                       "subject": alert.subject, "text": alert.text, "data": alert.data},
                      separators=(",", ":")).encode()


def alert_deliver(alert_id: int, attempt: int) -> float | None:
    """Try once to deliver what of the alert has not been delivered yet; return the seconds after which to try
    again, or ``None`` (delivered, or given up after the OPENOPEN8_WEBHOOK_RETRIES)."""
    alert = Alert.objects.filter(pk=alert_id).first()
    if alert is None:
        return None
    errors = []
    url = settings.OPENOPEN8_ALERT_WEBHOOK_URL
    if url and alert.delivered_at is None:
        body = alert_body(alert)
        headers = signed_headers(settings.OPENOPEN8_ALERT_WEBHOOK_SECRET, f"alert_{alert.pk}", body)
        try:
            status = http.post_callback(url, body, headers=headers, guarded=False,
                                        timeout=settings.OPENOPEN8_WEBHOOK_TIMEOUT)
            alert.webhook_status = status
            if 200 <= status < 300:
                alert.delivered_at = timezone.now()
            else:
                errors.append(f"webhook answered HTTP {status}")
        except GatewayError as failure:
            errors.append(f"webhook: {failure.message}")
    if _mail_configured() and alert.emailed_at is None:
        try:
            send_mail(f"[OpenOpen8] {alert.subject}", alert.text, None, settings.OPENOPEN8_ALERT_EMAIL)
            alert.emailed_at = timezone.now()
        except Exception as failure:  # smtplib and socket errors alike: the mail waits for the next try
            errors.append(f"mail: {type(failure).__name__}: {failure}")
    alert.attempts, alert.last_error = attempt, "; ".join(errors)[:300]
    alert.save(update_fields=["attempts", "webhook_status", "delivered_at", "emailed_at", "last_error"])
    retries = settings.OPENOPEN8_WEBHOOK_RETRIES
    if not errors or attempt > len(retries):
        return None
    return float(retries[attempt - 1])
