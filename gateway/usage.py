"""Usage rows and channel status: what happened to every request, for the operator."""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from functools import cache
from typing import Any, NamedTuple

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, InterfaceError, OperationalError, connection, connections, models, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone

from channels.adapters.base import ChannelTarget
from channels.models import Channel
from gateway.billing import budget_reserve, budget_settle, budget_statements, quota_exceeded
from gateway.errors import GatewayError
from gateway.models import ApiToken, UsageLog
from gateway.schemas import ImageRequest
from gateway.sweeper import SWEEP_GRACE_S

logger = logging.getLogger(__name__)


def usage_new(*, token: ApiToken, endpoint: str, request_id: str, body: Any) -> UsageLog:
    """An unsaved row with what is known before the request is checked. The prompt is kept as length and hash
    unless the operator turned prompt logging on."""
    log = UsageLog(token=token, endpoint=endpoint, request_id=request_id)
    fields = body if isinstance(body, dict) else {}
    prompt = fields.get("prompt")
    if isinstance(prompt, str):
        log.prompt_length = len(prompt)
        log.prompt_sha256 = hashlib.sha256(prompt.encode()).hexdigest()
        log.prompt = prompt if settings.OPENOPEN8_LOG_PROMPTS else ""
    model = fields.get("model")
    log.model = model[:100] if isinstance(model, str) else ""
    return log


def usage_describe(log: UsageLog, req: ImageRequest) -> None:
    log.model, log.n, log.size = req.model, req.n, req.size or ""
    log.quality, log.response_format = req.quality or "", req.response_format


# When this process last wrote each channel's last-used columns: a busy channel is written once a second, not on
# every request (the row would be a lock every request waits on).
_last_written: dict[int, float] = {}
WRITE_EVERY_S = 1.0


def attempt_record(target: ChannelTarget, *, latency_ms: int, error: GatewayError | None = None) -> dict[str, Any]:
    """Update the channel's last-used, latency and last-error columns (successes at most once a second per process);
    return the attempt for the usage row."""
    now = timezone.now()
    if error is None:
        if time.monotonic() - _last_written.get(target.id, -WRITE_EVERY_S) >= WRITE_EVERY_S:
            _last_written[target.id] = time.monotonic()
            Channel.objects.filter(pk=target.id).update(last_used_at=now, last_latency_ms=latency_ms, last_error="")
        return {"channel": target.id, "name": target.name, "outcome": "ok", "latency_ms": latency_ms}
    _last_written.pop(target.id, None)  # the next success clears the error at once
    Channel.objects.filter(pk=target.id).update(last_used_at=now, last_latency_ms=latency_ms,
                                                last_error=error.message[:500], last_error_at=now)
    return {"channel": target.id, "name": target.name, "outcome": "error", "status": error.status,
            "code": error.code, "message": error.message[:500], "latency_ms": latency_ms}


Refund = tuple[int, int]  # what a completion gives back to a budget: token id, micros

# What changes once a pending row is written: the completion writes these only.
COMPLETION_FIELDS = [
    "completed_at", "channel", "provider_model", "attempts", "images_returned", "status", "http_status", "error_type",
    "error_code", "error_message", "cost_micros", "reserved_micros", "latency_ms", "provider_latency_ms",
    "input_images", "input_bytes",
]


# Every request writes its row twice, and building that SQL through the ORM cost more than sending it (measured in
# bench/: ~0.75 ms of a ~3.5 ms request). The statements are built once per database vendor from the model's own
# fields. Values of text, integer and foreign-key columns go as they are, which is all their fields' get_db_prep_save
# does with the str and int values this module sets; the others (dates, JSON) still go through it, as Model.save would.
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
# it several times each: 9 % of a generation's instructions (bench/RESULTS.md). Each write looks it up once.
def usage_insert(log: UsageLog, *, durable: bool = True) -> None:
    """Insert the row (pending or, for a request refused early, complete) and set its primary key.

    ``durable=False`` is for a pending row that holds no budget: on PostgreSQL its commit does not wait for the WAL to
    reach the disk, which was 0.28-0.30 ms of a 0.66-0.71 ms insert on the bench machine (bench/RESULTS.md). A worker
    that dies cannot lose such a row; only a crash of the database server within a fraction of a second can. The
    completion is committed durably, and its flush writes this row's WAL too; a completion that finds its pending row
    gone writes the whole row. A budget hold is money, so a pending row that carries one is always committed durably.
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


# The most completed rows a usage writer writes in one statement.
BATCH_MAX = 100


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


# A completion's first retry waits this long, doubling up to the maximum (seconds).
RETRY_FIRST_S, RETRY_MAX_S = 0.05, 2.0


def usage_finish_retrying(log: UsageLog, *, refund: Refund | None, until: float) -> bool:
    """``usage_finish``, tried again while the database cannot be reached, until ``until`` (``time.time()``); return
    whether the row was written. A try can fail after its commit (the answer lost on the way back), so each retry
    first looks whether the row is still to be written: pending, or not there at all."""
    delay, tries = RETRY_FIRST_S, 0
    while True:
        try:
            if tries == 0 or _unwritten(log):
                usage_finish(log, refund=refund)
            if tries:
                logger.warning("usage row of request %s written after %d retries", log.request_id, tries)
            return True
        except (OperationalError, InterfaceError) as error:
            _close_connection()  # a broken connection goes; the next try takes another
            if time.time() + delay > until:
                logger.error("usage row of request %s not written, database unreachable (%s); the sweeper will fail "
                             "it and refund its hold", log.request_id, type(error).__name__)
                return False
            if not tries:
                logger.warning("usage row of request %s not written (%s); trying again", log.request_id,
                               type(error).__name__)
        except Exception:
            logger.exception("usage row of request %s not written; the sweeper will fail it and refund its hold",
                             log.request_id)
            return False
        tries += 1
        time.sleep(delay)
        delay = min(delay * 2, RETRY_MAX_S)


def _close_connection() -> None:
    """Close this thread's database connection (back to the pool), whatever state it is in: a usage writer must
    outlive a failing database."""
    try:
        connections[DEFAULT_DB_ALIAS].close()
    except Exception:
        logger.exception("could not close a database connection")


def _unwritten(log: UsageLog) -> bool:
    status = UsageLog.objects.filter(request_id=log.request_id).values_list("status", flat=True).first()
    return status in (None, UsageLog.Status.PENDING)


IDLE_S = 1.0  # a writer keeps its database connection while rows keep coming, and gives it back after this long


class UsageWriters:
    """A few threads (greenlets under gevent) that write completed rows handed to them, so that the answer does not
    wait for the commit: on PostgreSQL a durable commit waits for the disk, and without that wait a generation at one
    connection came back about 1.1 ms sooner on the bench machine (bench/RESULTS.md, runs 32-34).

    What a request owes is already safe before its answer goes: the budget hold is committed durably before any
    provider is called, and the completion only gives back what was not delivered. A database that goes away is
    retried until half the sweeper's grace is left; a worker killed before its rows are written leaves them pending
    for the sweeper, as a worker killed mid-request does, and one that stops gracefully writes them first
    (``drain``). When ``backlog`` rows wait already, a request writes its own.

    A writer takes every row that waits (up to ``BATCH_MAX``) and writes those without a refund in one statement and
    one commit: a burst of answers costs one round trip and one flush instead of one each. In alternating pairs at 32
    connections PostgreSQL's CPU a request fell from 0.52-0.57 to 0.43-0.55 ms (bench/RESULTS.md, runs 35-36).
    """

    def __init__(self, *, count: int = 4, backlog: int = 1000) -> None:
        self._queue: queue.Queue[tuple[UsageLog, Refund | None]] = queue.Queue(backlog)
        for number in range(count):
            threading.Thread(target=self._run, name=f"openopen8-usage-writer-{number}", daemon=True).start()

    def submit(self, log: UsageLog, refund: Refund | None) -> bool:
        """Hand the row over; ``False`` when the backlog is full and the caller must write it."""
        try:
            self._queue.put_nowait((log, refund))
        except queue.Full:
            return False
        return True

    def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the rows handed over to be written; return how many are left."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=IDLE_S)
            except queue.Empty:
                _close_connection()  # back to the pool while there is nothing to write
                first = self._queue.get()
            items = [first]
            while len(items) < BATCH_MAX:  # what else waits goes with it
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                _write_completions(items)
            finally:
                for _item in items:
                    self._queue.task_done()


def _write_completions(items: list[tuple[UsageLog, Refund | None]]) -> None:
    """Write completed rows handed over together: those written pending without a refund in one statement, the rest
    (and all of them, should that statement fail) one by one, each retried while the database is away."""
    together = [log for log, refund in items if refund is None and log.pk is not None]
    if len(together) > 1:
        try:
            usage_finish_many(together)
        except Exception:  # the database is away, or refuses one of the rows: each is written alone, and retried
            _close_connection()
        else:
            items = [(log, refund) for log, refund in items if refund is not None or log.pk is None]
    for log, refund in items:
        usage_finish_retrying(log, refund=refund, until=log.created_at.timestamp()
                              + settings.OPENOPEN8_REQUEST_DEADLINE + SWEEP_GRACE_S / 2)


_writers: UsageWriters | None = None


def usage_writers_start() -> None:
    """Start this process's usage writers (gunicorn's post_worker_init), when OPENOPEN8_WRITE_AFTER_ANSWER is on and
    the database is PostgreSQL: SQLite's commits hold the whole process, so there is nothing to overlap."""
    global _writers
    if _writers is None and settings.OPENOPEN8_WRITE_AFTER_ANSWER and connection.vendor == "postgresql":
        _writers = UsageWriters()


def usage_writers_drain(timeout: float) -> int:
    """Write what the usage writers still hold, for up to ``timeout`` seconds; return how many rows are left."""
    return _writers.drain(timeout) if _writers is not None else 0


def usage_complete(log: UsageLog, *, refund: Refund | None) -> None:
    """Write the completed row: by the usage writers where they run (after the answer has gone), else now."""
    if _writers is None or not _writers.submit(log, refund):
        usage_finish(log, refund=refund)


def usage_fail(log: UsageLog, error: GatewayError) -> None:
    log.status, log.http_status = UsageLog.Status.ERROR, error.status
    log.error_type, log.error_code, log.error_message = error.type, error.code or "", error.message[:2000]
