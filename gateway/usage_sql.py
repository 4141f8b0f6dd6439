"""The statements a usage row is written with, built once per database vendor from the model's own fields: every
request writes its row twice, and building that SQL through the ORM cost more than sending it (bench/RESULTS.md).

Values of text, integer and foreign-key columns go as they are, which is all their fields' ``get_db_prep_save`` does
with the str and int values the gateway sets; the others (dates, JSON) still go through it, as ``Model.save`` would.
On PostgreSQL the budget hold (``billing.py``) rides in the pending row's statement and the refund in the
completion's.
"""

from __future__ import annotations

from functools import cache
from typing import Any, NamedTuple

from django.db import DEFAULT_DB_ALIAS, connection, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from gateway.billing import budget_reserve, budget_settle, budget_statements, quota_exceeded
from gateway.models import UsageLog

Refund = tuple[int, int]  # what a completion gives back to a budget: token id, micros

# What is settled before the pending row is written and never changes after. The completion writes every other
# field, so a field added to the model is written at completion unless it is named here.
PENDING_FIELDS = frozenset({"created_at", "request_id", "token", "endpoint", "model", "n", "size", "quality",
                            "response_format", "prompt_length", "prompt_sha256", "prompt"})
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
    pending: str  # the insert, for a pending row without a budget hold (see usage_insert)
    update: str
    # PostgreSQL: the pending insert with its budget hold, and the completion with its refund, each one statement
    # (elsewhere: two, in a transaction).
    holding: str | None
    refunding: str | None
    # PostgreSQL: the completions of several requests in one statement (UsageWriters): one array a column, so that
    # one prepared statement serves any number of rows.
    update_many: str | None


def _cast(field: Any) -> str:
    """The column's type without its length, which an explicit cast would cut values to instead of refusing them."""
    return str(field.cast_db_type(connection)).split("(")[0]


@cache
def _statements(vendor: str) -> _Statements:
    quote = connection.ops.quote_name
    pk_field: Any = UsageLog._meta.pk
    table, pk = quote(UsageLog._meta.db_table), quote(pk_field.column)
    columns = ", ".join(quote(f.column) for f in _INSERT_FIELDS)
    marks = ", ".join(["%s"] * len(_INSERT_FIELDS))
    assignments = ", ".join(f"{quote(f.column)} = %s" for f in _COMPLETION)
    insert = f"INSERT INTO {table} ({columns}) VALUES ({marks}) RETURNING {pk}"
    update = f"UPDATE {table} SET {assignments} WHERE {pk} = %s"
    if vendor != "postgresql":
        return _Statements(insert, insert, update, None, None, None)
    # synchronous_commit goes off for the statement's own transaction only (set_config's is_local), in the same round
    # trip: evaluated in RETURNING, before the commit that reads it.
    pending = f"{insert}, set_config('synchronous_commit', 'off', true)"
    hold, settle = budget_statements(vendor)
    # Data-modifying WITH clauses run once, whether or not the statement reads them. The row's values are cast, as
    # in a SELECT they would not take their columns' types.
    casts = ", ".join(f"%s::{_cast(f)}" for f in _INSERT_FIELDS)
    holding = (f"WITH hold AS ({hold} RETURNING 1) "
               f"INSERT INTO {table} ({columns}) SELECT {casts} WHERE EXISTS (SELECT 1 FROM hold) RETURNING {pk}")
    names = [f"c{i}" for i in range(len(_COMPLETION))]
    update_many = (f"UPDATE {table} SET " + ", ".join(f"{quote(f.column)} = v.{name}"
                                                     for f, name in zip(_COMPLETION, names, strict=True))
                   + " FROM unnest(" + ", ".join(f"%s::{_cast(f)}[]" for f in _COMPLETION)
                   + f", %s::{_cast(pk_field)}[]) AS v({', '.join(names)}, pk) WHERE {table}.{pk} = v.pk "
                   f"RETURNING {table}.{pk}")
    return _Statements(insert, pending, update, holding, f"WITH refund AS ({settle}) {update}", update_many)


def _values(log: UsageLog, how: list[tuple[str, Any]], adding: bool, db: BaseDatabaseWrapper) -> list[Any]:
    row = log.__dict__
    return [row[name] if field is None else field.get_db_prep_save(field.pre_save(log, adding), db)
            for name, field in how]


def _inserted(log: UsageLog, pk: int, db: BaseDatabaseWrapper) -> None:
    log.pk = pk
    log._state.adding, log._state.db = False, db.alias


# ``django.db.connection`` is a proxy that finds this thread's connection on every attribute read, and the fields read
# it several times each (bench/RESULTS.md): each write looks it up once.
def usage_insert(log: UsageLog, *, durable: bool = True) -> None:
    """Insert the row (pending or, for a request refused early, complete) and set its primary key.

    ``durable=False`` is for a pending row that holds no budget: on PostgreSQL its commit does not wait for the WAL to
    reach the disk, most of the insert's time (bench/RESULTS.md). A worker that dies cannot lose such a row; only a
    crash of the database server within a fraction of a second can. The completion is committed durably, and its
    flush writes this row's WAL too; a completion that finds its pending row gone writes the whole row. A budget hold
    is money, so a pending row that carries one is always committed durably.
    """
    db = connections[DEFAULT_DB_ALIAS]
    statements = _statements(db.vendor)
    # Inside a transaction the setting would outlast this row, so there the insert is as durable as the rest.
    insert = statements.insert if durable or db.in_atomic_block else statements.pending
    with db.cursor() as cursor:
        cursor.execute(insert, _values(log, _INSERT_VALUES, True, db))
        _inserted(log, cursor.fetchone()[0], db)


def usage_insert_holding(log: UsageLog, *, token_id: int, micros: int) -> None:
    """Insert the pending row with a hold of ``micros`` on the token's budget: both or neither, committed durably.
    Raises ``InsufficientQuota`` when the budget does not cover the hold; nothing is written or held then."""
    log.reserved_micros = micros
    db = connections[DEFAULT_DB_ALIAS]
    holding = _statements(db.vendor).holding
    try:
        if holding is None:
            with transaction.atomic(using=db.alias):
                usage_insert(log)
                budget_reserve(token_id=token_id, micros=micros)
            return
        with db.cursor() as cursor:
            cursor.execute(holding, [micros, token_id, micros, *_values(log, _INSERT_VALUES, True, db)])
            row = cursor.fetchone()
        if row is None:
            raise quota_exceeded()
        _inserted(log, row[0], db)
    except BaseException:
        log.pk, log.reserved_micros = None, 0  # rolled back: nothing was written or held
        log._state.adding = True
        raise


def usage_finish(log: UsageLog, *, refund: Refund | None = None) -> None:
    """Write the completed row: an update of what changed if it was written pending, else the whole row (also when
    the pending row is no longer there). ``refund`` (token id, micros) gives that much of the row's hold back to the
    token in the same transaction."""
    db = connections[DEFAULT_DB_ALIAS]
    statements = _statements(db.vendor)
    if refund is None:
        _complete(log, db, statements.update, [])
    elif statements.refunding is not None:
        _complete(log, db, statements.refunding, [-refund[1], refund[0]])
    else:
        with transaction.atomic(using=db.alias):
            _complete(log, db, statements.update, [])
            budget_settle(token_id=refund[0], micros=-refund[1])


def _complete(log: UsageLog, db: BaseDatabaseWrapper, update: str, first: list[Any]) -> None:
    if log.pk is not None:
        with db.cursor() as cursor:
            cursor.execute(update, [*first, *_values(log, _COMPLETION_VALUES, False, db), log.pk])
            if cursor.rowcount:
                return
        log.pk = None
    usage_insert(log)


def _columns(rows: list[list[Any]]) -> list[list[Any]]:
    """Rows of values as one list a column: the parameters of ``update_many``."""
    return [list(column) for column in zip(*rows, strict=True)]


def usage_finish_many(logs: list[UsageLog]) -> None:
    """``usage_finish`` for several rows written pending, none with a refund, in one statement (PostgreSQL). Writing
    a completion again writes the same values, so a batch that failed after its commit may be written again."""
    db = connections[DEFAULT_DB_ALIAS]
    statement = _statements(db.vendor).update_many
    assert statement is not None  # PostgreSQL only: the usage writers run on nothing else
    rows = [[*_values(log, _COMPLETION_VALUES, False, db), log.pk] for log in logs]
    with db.cursor() as cursor:
        cursor.execute(statement, _columns(rows))
        found = {pk for (pk,) in cursor.fetchall()}
    for log in logs:
        if log.pk not in found:  # its pending row is gone: the whole row
            log.pk = None
            usage_insert(log)


