"""One history of what changed in tokens, groups, channels and prices (django-auditlog): who (an operator, or the
gateway itself when it sets a key aside or disables a channel), when, and the old and new values. Keys and
secrets are recorded by their last four characters only; running counters (spent, last used) are left out."""

from __future__ import annotations

from auditlog.registry import auditlog

# Written on every request or by the gateway's bookkeeping: not changes anyone made.
CHANNEL_COUNTERS = ["last_error", "last_error_at", "last_used_at", "last_latency_ms", "last_test_at", "last_test_ok",
                    "last_test_message", "last_test_latency_ms"]
BUDGET_COUNTERS = ["spent_micros", "period_key"]


def mask_secret(value: str) -> str:
    """Each line of a secret as its last four characters, the way the console shows keys."""
    lines = [line.strip() for line in value.splitlines() if line.strip()]
    return ", ".join(f"…{line[-4:]}" if len(line) > 8 else "(set)" for line in lines) or "(none)"


def audit_register() -> None:
    from channels.models import Channel
    from gateway.models import ApiToken, Price, TokenGroup

    mask = "gateway.audit.mask_secret"
    auditlog.register(Channel, exclude_fields=CHANNEL_COUNTERS, mask_fields=["api_key"], mask_callable=mask)
    auditlog.register(ApiToken, exclude_fields=[*BUDGET_COUNTERS, "last_used_at", "key_hash"],
                      mask_fields=["webhook_secret"], mask_callable=mask)
    auditlog.register(TokenGroup, exclude_fields=BUDGET_COUNTERS)
    auditlog.register(Price)
