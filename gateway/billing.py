"""Budget reservations: held before a provider is called, settled to what was delivered after.

Each change is one conditional UPDATE in SQL, never a read followed by a write, so concurrent requests of one token
cannot overspend it on any database. The statements are written once, not built by the ORM per request, which cost
more than sending them (bench/RESULTS.md). gateway/usage_sql.py sends them in the same statement as the usage row
where the database can.

A budget renews by its period's key (``Budgeted.period_key``): a hold under a newer key than the one stored starts
the count again from zero, and a later adjustment (refund, or cost beyond the hold) applies only while the key it
was held under is still the stored one, so no clock job is needed for correctness. A request of a token in a group
holds both budgets, in one transaction.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections, transaction

from gateway.models import ApiToken, Budgeted, TokenGroup, UsageLog
from openopen8.core.errors import InsufficientQuota


@cache
def budget_statements(model: type[Budgeted]) -> tuple[str, str]:
    """For ``model``'s table: the hold, which changes nothing when the budget does not cover it (parameters:
    ``hold_params``), and the adjustment, which changes nothing once the period has moved on (parameters: micros,
    id, period key)."""
    quote, fields = connection.ops.quote_name, {f.name: str(f.column) for f in model._meta.concrete_fields}
    table, pk = quote(model._meta.db_table), quote(fields["id"])
    spent, budget, key = (quote(fields[name]) for name in ("spent_micros", "budget_micros", "period_key"))
    hold = (f"UPDATE {table} SET {spent} = CASE WHEN {key} >= %s THEN {spent} + %s ELSE %s END, "
            f"{key} = CASE WHEN {key} >= %s THEN {key} ELSE %s END "
            f"WHERE {pk} = %s AND ({budget} IS NULL OR {budget} >= CASE WHEN {key} >= %s THEN {spent} ELSE 0 END + %s)")
    adjust = f"UPDATE {table} SET {spent} = {spent} + %s WHERE {pk} = %s AND {key} = %s"
    return hold, adjust


def hold_params(*, micros: int, pk: int, period: int) -> list[Any]:
    return [period, micros, micros, period, period, pk, period, micros]


def quota_exceeded(of: str = "token") -> InsufficientQuota:
    """The refusal when the budget of the token, or of its ``"group"``, does not cover a hold."""
    whose = "your group's budget" if of == "group" else "this API key's budget"
    error = InsufficientQuota(f"You exceeded your current quota: {whose} does not cover this request. "
                              "Ask the gateway's operator to raise it.")
    error.budget_of = of
    return error


def holds_for(log: UsageLog, token: ApiToken) -> bool:
    """Note on ``log`` which budgets its request holds (the token's, its group's) and under which period keys;
    return whether it holds any."""
    if token.budget_micros is not None:
        log.budget_period = token.current_period()
    group = token.group
    if group is not None:
        log.group_id = group.pk
        if group.budget_micros is not None:
            log.group_period = group.current_period()
    return log.budget_period is not None or log.group_period is not None


def budget_reserve(log: UsageLog, *, micros: int) -> None:
    """Hold ``micros`` from each budget ``log`` holds, in the caller's transaction. Raises ``InsufficientQuota``
    when one does not cover it (the caller's transaction then rolls the others back)."""
    if micros <= 0:
        return
    db = connections[DEFAULT_DB_ALIAS]
    for model, pk, period, of in ((ApiToken, log.token_id, log.budget_period, "token"),
                                  (TokenGroup, log.group_id, log.group_period, "group")):
        if period is None or pk is None:
            continue
        with db.cursor() as cursor:
            cursor.execute(budget_statements(model)[0], hold_params(micros=micros, pk=pk, period=period))
            if not cursor.rowcount:
                raise quota_exceeded(of)


def budget_adjust(log: UsageLog, *, micros: int) -> None:
    """Add ``micros`` to what each budget ``log`` held spent (negative: give back part of a hold), while the period
    it was held in runs. Not checked against the budgets: what they cover is decided when the hold is taken."""
    if not micros:
        return
    db = connections[DEFAULT_DB_ALIAS]
    with transaction.atomic(using=db.alias):
        for model, pk, period in ((ApiToken, log.token_id, log.budget_period),
                                  (TokenGroup, log.group_id, log.group_period)):
            if period is not None and pk is not None:
                with db.cursor() as cursor:
                    cursor.execute(budget_statements(model)[1], [micros, pk, period])
