"""Budget reservations: held before a provider is called, settled to what was delivered after.

Each change is one conditional UPDATE in SQL, never a read followed by a write, so concurrent requests of one token
cannot overspend it on any database. The statements are written once, not built by the ORM per request, which cost
more than sending them (bench/RESULTS.md). gateway/usage_sql.py sends them in the same statement as the usage row
where the database can.
"""

from __future__ import annotations

from functools import cache

from django.db import DEFAULT_DB_ALIAS, connection, connections

from gateway.models import ApiToken
from openopen8.core.errors import InsufficientQuota


@cache
def budget_statements(vendor: str) -> tuple[str, str]:
    """The hold, which changes nothing when the budget does not cover it (parameters: micros, token id, micros), and
    the settle (parameters: micros, token id)."""
    quote, fields = connection.ops.quote_name, {f.name: str(f.column) for f in ApiToken._meta.concrete_fields}
    table, pk = quote(ApiToken._meta.db_table), quote(fields["id"])
    spent, budget = quote(fields["spent_micros"]), quote(fields["budget_micros"])
    settle = f"UPDATE {table} SET {spent} = {spent} + %s WHERE {pk} = %s"
    return f"{settle} AND ({budget} IS NULL OR {budget} >= {spent} + %s)", settle


def quota_exceeded() -> InsufficientQuota:
    return InsufficientQuota(
        "You exceeded your current quota: this API key's budget does not cover this request. "
        "Ask the gateway's operator to raise it."
    )


def budget_reserve(*, token_id: int, micros: int) -> None:
    """Hold ``micros`` from the token's budget. Raises ``InsufficientQuota`` when the budget cannot cover it."""
    if micros <= 0:
        return
    db = connections[DEFAULT_DB_ALIAS]
    with db.cursor() as cursor:
        cursor.execute(budget_statements(db.vendor)[0], [micros, token_id, micros])
        if not cursor.rowcount:
            raise quota_exceeded()


def budget_settle(*, token_id: int, micros: int) -> None:
    """Add ``micros`` to what the token spent (negative: give back part of a hold). Not checked against the budget:
    what a budget covers is decided when the hold is taken."""
    if micros:
        db = connections[DEFAULT_DB_ALIAS]
        with db.cursor() as cursor:
            cursor.execute(budget_statements(db.vendor)[1], [micros, token_id])
