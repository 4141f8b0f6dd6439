"""The statements a usage row is written with, built once per database vendor from the model's own fields: every
request writes its row twice, and building that SQL through the ORM cost more than sending it (bench/RESULTS.md).

Values of text, integer and foreign-key columns go as they are, which is all their fields' ``get_db_prep_save`` does
with the str and int values the gateway sets; the others (dates, JSON) still go through it, as ``Model.save`` would.
On PostgreSQL the budget hold (``billing.py``) rides in the pending row's statement and the refund in the
completion's.

A row is found by its request id (random, unique), never by its serial key, which a database that lost rows in a
crash hands out again. Every pending row is committed durably before a provider is called, and a completion is written
once whatever is tried again: it applies only to a row still pending, and ``_settle_strays`` decides the rest (the
row missing, already swept, or already written).
"""

from __future__ import annotations

import logging
import time
from functools import cache
from typing import Any, NamedTuple

from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    InterfaceError,
    OperationalError,
    connection,
    connections,
    models,
    transaction,
)
from django.db.backends.base.base import BaseDatabaseWrapper

from gateway.billing import budget_adjust, budget_reserve, budget_statements, hold_params, quota_exceeded
from gateway.models import ApiToken, UsageLog

logger = logging.getLogger("gateway.usage")  # every message about usage rows under one name

# The sweeper's mark on a pending row it failed and refunded.
ABANDONED = "abandoned"

# What is settled before the pending row is written and never changes after. The completion writes every other
# field, so a field added to the model is written at completion unless it is named here.
PENDING_FIELDS = frozenset({"created_at", "request_id", "token", "endpoint", "model", "n", "size", "quality",
                            "response_format", "prompt_length", "prompt_sha256", "prompt", "hold_micros", "price",
                            "unit_prices", "budget_period", "group", "group_period"})
COMPLETION_FIELDS = [f.name for f in UsageLog._meta.concrete_fields
                     if not f.primary_key and f.name not in PENDING_FIELDS]

_PLAIN = (models.CharField, models.TextField, models.IntegerField, models.ForeignKey)
_INSERT_FIELDS: list[Any] = [f for f in UsageLog._meta.concrete_fields if not f.primary_key]
_COMPLETION: list[Any] = [UsageLog._meta.get_field(name) for name in COMPLETION_FIELDS]


def _how(fields: list[Any]) -> list[tuple[str, Any]]:
    return [(f.attname, None if isinstance(f, _PLAIN) else f) for f in fields]


_INSERT_VALUES, _COMPLETION_VALUES = _how(_INSERT_FIELDS), _how(_COMPLETION)


class _Statements(NamedTuple):
    insert: str
    # The completion of a row still pending (parameters: the completion's values, request id, "pending"); the
    # same without the condition, for a row ``_settle_strays`` has locked.
    update: str
    update_any: str
    # PostgreSQL, for a request holding its token's budget alone: the pending insert with its hold, and the
    # completion with its refund (parameters: the update's, then the micros given back and the period key), each one
    # statement (elsewhere, and with a group's budget too: several, in a transaction).
    holding: str | None
    refunding: str | None
    # PostgreSQL: the completions of several requests in one statement (UsageWriters): one array a column, so that
    # one prepared statement serves any number of rows.
    update_many: str | None


def _cast(field: Any) -> str:
    """The column's type without its length, which an explicit cast would cut values to instead of refusing them."""
    return str(field.cast_db_type(connection)).split("(")[0]


@cache
def _column(model: Any, name: str) -> str:
    return str(connection.ops.quote_name(str(model._meta.get_field(name).column)))


@cache  # built once per vendor: building them casts every column's type each time
def _statements(vendor: str) -> _Statements:
    quote = connection.ops.quote_name
    table = quote(UsageLog._meta.db_table)
    rid, status, token_column = (_column(UsageLog, name) for name in ("request_id", "status", "token"))
    columns = ", ".join(quote(f.column) for f in _INSERT_FIELDS)
    marks = ", ".join(["%s"] * len(_INSERT_FIELDS))
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in _COMPLETION)
    insert = f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING {_column(UsageLog, 'id')}"
    update_any = f"UPDATE {table} SET {assignments} WHERE {rid} = %s"
    update = f"{update_any} AND {status} = %s"
    if vendor != "postgresql":
        return _Statements(insert, update, update_any, None, None, None)
    hold, _adjust = budget_statements(ApiToken)
    # Data-modifying WITH clauses run once, whether or not the statement reads them. The row's values are cast, as
    # in a SELECT they would not take their columns' types.
    casts = ", ".join(f"%s::{_cast(f)}" for f in _INSERT_FIELDS)
    holding = (f"WITH hold AS ({hold} RETURNING 1) "
               f"INSERT INTO {table} ({columns}) SELECT {casts} WHERE EXISTS (SELECT 1 FROM hold) RETURNING 1")
    # The refund reads what the row's own update returned: a completion racing another for the same row waits for
    # its lock, finds it no longer pending, and gives nothing back.
    tokens, spent = quote(ApiToken._meta.db_table), _column(ApiToken, "spent_micros")
    refunding = (f"WITH done AS ({update} RETURNING {token_column} AS token), refund AS (UPDATE {tokens} SET "
                 f"{spent} = {spent} - %s WHERE {_column(ApiToken, 'id')} = (SELECT token FROM done) AND "
                 f"{_column(ApiToken, 'period_key')} = %s) SELECT count(*) FROM done")
    names = [f"c{i}" for i in range(len(_COMPLETION))]
    update_many = (f"UPDATE {table} SET " + ", ".join(f"{quote(f.column)} = v.{name}"
                                                     for f, name in zip(_COMPLETION, names, strict=True))
                   + " FROM unnest(" + ", ".join(f"%s::{_cast(f)}[]" for f in _COMPLETION)
                   + f", %s::text[]) AS v({', '.join(names)}, rid) WHERE {table}.{rid} = v.rid AND {table}.{status} = "
                   f"%s RETURNING {table}.{rid}")
    return _Statements(insert, update, update_any, holding, refunding, update_many)


def _values(log: UsageLog, how: list[tuple[str, Any]], adding: bool, db: BaseDatabaseWrapper) -> list[Any]:
    row = log.__dict__
    return [row[name] if field is None else field.get_db_prep_save(field.pre_save(log, adding), db)
            for name, field in how]


def _written(log: UsageLog, db: BaseDatabaseWrapper) -> None:
    log._state.adding, log._state.db = False, db.alias


# ``django.db.connection`` is a proxy that finds this thread's connection on every attribute read, and the fields read
# it several times each (bench/RESULTS.md): each write looks it up once.
def usage_insert(log: UsageLog) -> None:
    """Insert the row (pending or, for a request refused early, complete), committed durably: a pending row is the
    promise that the request will be accounted for, so it must outlive a crash of the database server."""
    db = connections[DEFAULT_DB_ALIAS]
    with db.cursor() as cursor:
        cursor.execute(_statements(db.vendor).insert, _values(log, _INSERT_VALUES, True, db))
        log.pk = cursor.fetchone()[0]
    _written(log, db)


# How long a budget hold whose answer was lost is looked for before the request gives up (seconds).
HOLD_LOOKUP_S = 2.0


def usage_insert_holding(log: UsageLog, *, micros: int) -> None:
    """Insert the pending row with a hold of ``micros`` on each budget ``log`` holds (``billing.holds_for``): all or
    nothing, committed durably. Raises ``InsufficientQuota`` when a budget does not cover the hold; nothing is written
    or held then.

    When the database's answer is lost (the connection dropped around the commit), the row is looked for: found, it
    holds the budget and the request goes on; not found, nothing was held. When it cannot be looked for either, the
    error is raised with the row marked as perhaps written, so that its completion gives the hold back if it exists.
    """
    log.reserved_micros = log.hold_micros = micros
    db = connections[DEFAULT_DB_ALIAS]
    holding = _statements(db.vendor).holding if _token_alone(log) else None
    try:
        if holding is None:
            with transaction.atomic(using=db.alias):
                usage_insert(log)
                budget_reserve(log, micros=micros)
            return
        assert log.token_id is not None and log.budget_period is not None
        with db.cursor() as cursor:
            cursor.execute(holding, [*hold_params(micros=micros, pk=log.token_id, period=log.budget_period),
                                     *_values(log, _INSERT_VALUES, True, db)])
            row = cursor.fetchone()
        if row is None:
            raise quota_exceeded()
        _written(log, db)
    except (OperationalError, InterfaceError):
        landed = _landed(log)
        if landed:
            logger.warning("the budget hold of request %s was committed though its answer was lost", log.request_id)
            _written(log, db)
            return
        if landed is None:
            log._state.adding = False  # perhaps written: the completion refunds the hold only if it is there
            raise
        _not_written(log)
        raise
    except BaseException:
        _not_written(log)
        raise


def _token_alone(log: UsageLog) -> bool:
    """Whether the request holds its token's budget and no group's: the case one statement serves."""
    return log.budget_period is not None and log.group_period is None


def _not_written(log: UsageLog) -> None:
    log.pk, log.reserved_micros, log.hold_micros = None, 0, 0
    log._state.adding = True


def _landed(log: UsageLog) -> bool | None:
    """Whether the row was committed, asked on a new connection; ``None`` when the database cannot say."""
    end = time.monotonic() + HOLD_LOOKUP_S
    while True:
        try:
            connections[DEFAULT_DB_ALIAS].close()
            return UsageLog.objects.filter(request_id=log.request_id).exists()
        except (OperationalError, InterfaceError):
            if time.monotonic() > end:
                return None
            time.sleep(0.1)


def usage_finish(log: UsageLog, *, held: int = 0) -> None:
    """Write the completed row once, however often it is called: an update of what changed while it is pending (the
    part of the hold ``held`` that the row's cost does not use given back to the token in the same transaction),
    the whole row if it was never written; anything else ``_settle_strays`` decides."""
    db = connections[DEFAULT_DB_ALIAS]
    if log._state.adding:
        try:
            with transaction.atomic(using=db.alias):
                usage_insert(log)
        except IntegrityError:  # written already, by an earlier try whose answer was lost
            _settle_strays(log, held, db)
        return
    # What the hold does not cover is charged too (negative refund): a budget is never charged less than the cost.
    statements, refund = _statements(db.vendor), (held - log.cost_micros) if held else 0
    params = [*_values(log, _COMPLETION_VALUES, False, db), log.request_id, UsageLog.Status.PENDING]
    if not refund:
        with db.cursor() as cursor:
            cursor.execute(statements.update, params)
            done = cursor.rowcount > 0
    elif statements.refunding is not None and _token_alone(log):
        with db.cursor() as cursor:
            cursor.execute(statements.refunding, [*params, refund, log.budget_period])
            done = cursor.fetchone()[0] > 0
    else:
        with transaction.atomic(using=db.alias):
            with db.cursor() as cursor:
                cursor.execute(statements.update, params)
                done = cursor.rowcount > 0
            if done:
                budget_adjust(log, micros=-refund)
    if not done:
        _settle_strays(log, held, db)


def _settle_strays(log: UsageLog, held: int, db: BaseDatabaseWrapper) -> None:
    """A completion whose row is not pending: missing (lost with a crash, or its hold never landed), written whole;
    swept as abandoned (its hold refunded), completed and its images charged again; already written, left alone.
    One transaction, the row locked against the sweeper and other tries."""
    with transaction.atomic(using=db.alias):
        found = (UsageLog.objects.select_for_update().filter(request_id=log.request_id)
                 .values_list("status", "error_code").first())
        if found is None:
            log.pk, log._state.adding = None, True
            usage_insert(log)
            charge = log.cost_micros if held else 0  # there is no hold to settle: a budget pays for it now
        elif found[0] == UsageLog.Status.PENDING:
            charge = log.cost_micros - held
        elif found == (UsageLog.Status.ERROR, ABANDONED):
            charge = log.cost_micros if held else 0  # the sweeper gave the whole hold back
            logger.warning("usage row of request %s was swept before its completion came; written now, its cost "
                           "charged", log.request_id)
        else:
            return
        if found is not None:
            with db.cursor() as cursor:
                cursor.execute(_statements(db.vendor).update_any,
                               [*_values(log, _COMPLETION_VALUES, False, db), log.request_id])
        if charge:
            budget_adjust(log, micros=charge)


def _columns(rows: list[list[Any]]) -> list[list[Any]]:
    """Rows of values as one list a column: the parameters of ``update_many``."""
    return [list(column) for column in zip(*rows, strict=True)]


def usage_finish_many(items: list[tuple[UsageLog, int]]) -> None:
    """``usage_finish`` for several rows written pending (each with its hold), none with anything to refund, in one
    statement (PostgreSQL); those not pending any more are settled one by one."""
    db = connections[DEFAULT_DB_ALIAS]
    statement = _statements(db.vendor).update_many
    assert statement is not None  # PostgreSQL only: the usage writers run on nothing else
    rows = [[*_values(log, _COMPLETION_VALUES, False, db), log.request_id] for log, _held in items]
    with db.cursor() as cursor:
        cursor.execute(statement, [*_columns(rows), UsageLog.Status.PENDING])
        found = {rid for (rid,) in cursor.fetchall()}
    for log, held in items:
        if log.request_id not in found:
            _settle_strays(log, held, db)
