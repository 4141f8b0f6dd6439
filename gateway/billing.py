"""Budget reservations: held before a provider is called, settled to what was delivered after.

Each change is one conditional UPDATE in SQL, never a read followed by a write, so concurrent requests of one token
cannot overspend it on any database.
"""

from __future__ import annotations

from django.db.models import F, Q

from gateway.errors import InsufficientQuota
from gateway.models import ApiToken


def budget_reserve(*, token_id: int, micros: int) -> None:
    """Hold ``micros`` from the token's budget. Raises ``InsufficientQuota`` when the budget cannot cover it."""
    if micros <= 0:
        return
    covered = Q(budget_micros__isnull=True) | Q(budget_micros__gte=F("spent_micros") + micros)
    if not ApiToken.objects.filter(covered, pk=token_id).update(spent_micros=F("spent_micros") + micros):
        raise InsufficientQuota(
            "You exceeded your current quota: this API key's budget does not cover this request. "
            "Ask the gateway's operator to raise it."
        )


def budget_settle(*, token_id: int, micros: int) -> None:
    """Add ``micros`` to what the token spent (negative: give back part of a hold). Not checked against the budget:
    what a budget covers is decided when the hold is taken."""
    if micros:
        ApiToken.objects.filter(pk=token_id).update(spent_micros=F("spent_micros") + micros)
