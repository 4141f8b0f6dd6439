"""How a request's usage row reaches the database: pending before the provider is called, completed after."""

from __future__ import annotations

import time
import unittest
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from unittest import mock

import psycopg
from django.db import OperationalError, connection
from django.db.backends.utils import CursorWrapper
from django.test import TransactionTestCase
from django.utils import timezone

from gateway.journal import journal_parked, journal_replay
from gateway.models import ApiToken, UsageLog
from gateway.sweeper import usage_sweep
from gateway.usage import usage_body, usage_new
from gateway.usage_sql import usage_finish, usage_insert, usage_insert_holding
from gateway.usage_writers import _write_completions, usage_finish_retrying, usage_write
from tests.base import post_json
from tests.factories import make_channel, make_token, openai_images
from tests.fake_upstream import FakeUpstream, Recorded
from tests.processes import database_url


class UsageRowTests(TransactionTestCase):
    """Real commits (no test transaction around them), as under the production server."""

    def test_a_pending_row_lost_before_its_completion_is_written_whole(self) -> None:
        # As after a database crash that took an unflushed pending row with it: the completion must not vanish too.
        _token, key = make_token()

        def answer_after_losing_the_row(request: Recorded) -> Any:
            self.assertEqual(UsageLog.objects.filter(status="pending").delete()[0], 1)
            return openai_images(1)

        with FakeUpstream() as up:
            up.respond(200, answer_after_losing_the_row)
            make_channel(base_url=up.url)
            r = post_json(self.client, "/v1/images/generations",
                          {"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"}, key)
        self.assertEqual(r.status_code, 200, r.content[:300])
        row = UsageLog.objects.get()
        self.assertEqual((row.request_id, row.status, row.http_status, row.images_returned, row.prompt_length),
                         (r["x-request-id"], "success", 200, 1, 1))
        self.assertEqual(row.attempts[0]["outcome"], "ok")

    def test_a_completion_written_twice_counts_once(self) -> None:
        # As when a replay of the journal and the writer both write it, or a try whose answer was lost is repeated.
        token, _key = make_token(budget="1.00")
        log = held_row(token, "req_twice", hold=32000)
        completed(log, images=1)
        usage_finish(log, held=32000)
        usage_finish(log, held=32000)
        self.assertEqual(spent(token), 16000)
        self.assertEqual(UsageLog.objects.get().status, "success")

    def test_a_completion_that_comes_after_the_sweep_is_written_and_charged_again(self) -> None:
        # Its journal was on a node that was down: the sweeper refunded the hold; the images were delivered.
        token, _key = make_token(budget="1.00")
        log = held_row(token, "req_late", hold=32000)
        UsageLog.objects.filter(request_id="req_late").update(created_at=timezone.now() - timedelta(hours=1))
        self.assertEqual(usage_sweep(grace=0), 1)
        self.assertEqual(spent(token), 0)
        completed(log, images=2)
        with self.assertLogs("gateway.usage", "WARNING") as logs:
            usage_finish(log, held=32000)
        self.assertIn("swept before its completion", logs.output[0])
        row = UsageLog.objects.get()
        self.assertEqual((row.status, row.error_code, row.cost_micros, row.images_returned), ("success", "", 32000, 2))
        self.assertEqual(spent(token), 32000)
        self.assertEqual(usage_sweep(grace=0), 0)

    def test_a_completion_is_found_by_its_request_id_not_by_a_reused_serial_key(self) -> None:
        # A crash lost a pending row and the database handed its serial key to the next row.
        token, _key = make_token()
        lost = usage_new(token=token, endpoint="generations", request_id="req_lost")
        usage_insert(lost)
        UsageLog.objects.filter(request_id="req_lost").delete()
        other = usage_new(token=token, endpoint="generations", request_id="req_other")
        other.pk = lost.pk
        other.save(force_insert=True)
        completed(lost, images=1)
        usage_finish(lost)
        rows = dict(UsageLog.objects.values_list("request_id", "status"))
        self.assertEqual(rows, {"req_lost": "success", "req_other": "pending"})

    def test_a_budget_hold_whose_answer_was_lost_is_recognised_and_completed_normally(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only: the hold is one statement there, whose answer can be lost")
        token, _key = make_token(budget="1.00")
        log = usage_new(token=token, endpoint="generations", request_id="req_ack")
        usage_body(log, {"prompt": "a"})
        with answer_lost_after_commit():
            with self.assertLogs("gateway.usage", "WARNING") as logs:
                usage_insert_holding(log, micros=32000)
        self.assertIn("committed though its answer was lost", logs.output[0])
        self.assertEqual(spent(token), 32000)  # the hold is there, once
        completed(log, images=1)
        usage_finish(log, held=32000)
        row = UsageLog.objects.get()
        self.assertEqual((row.status, row.cost_micros, row.reserved_micros), ("success", 16000, 0))
        self.assertEqual(spent(token), 16000)


def held_row(token: ApiToken, request_id: str, *, hold: int) -> UsageLog:
    log = usage_new(token=token, endpoint="generations", request_id=request_id)
    usage_body(log, {"prompt": "a"})
    usage_insert_holding(log, micros=hold)
    return log


def completed(log: UsageLog, *, images: int) -> UsageLog:
    """The row as the request path leaves it after ``images`` delivered at 16,000 µUSD each."""
    log.status, log.http_status, log.images_returned = UsageLog.Status.SUCCESS, 200, images
    log.cost_micros, log.completed_at, log.reserved_micros = 16000 * images, timezone.now(), 0
    return log


def spent(token: ApiToken) -> int:
    return ApiToken.objects.get(pk=token.pk).spent_micros


@contextmanager
def answer_lost_after_commit() -> Iterator[None]:
    """The next statement the gateway sends commits, and then its answer is lost, as when the connection drops
    just after the commit."""
    real = CursorWrapper.execute
    sent: list[str] = []

    def execute(self: Any, sql: str, params: Any = None) -> Any:
        result = real(self, sql, params)
        if not sent:
            sent.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return result

    with mock.patch.object(CursorWrapper, "execute", execute):
        yield


class CompletionRetryTests(TransactionTestCase):
    """A completion written after the answer (gunicorn workers on PostgreSQL) is tried again when the database goes
    away, and never written twice."""

    def setUp(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        self.token, _key = make_token(budget="1.00")
        self.log = usage_new(token=self.token, endpoint="generations", request_id="req_retry")
        usage_body(self.log, {"prompt": "a"})
        usage_insert_holding(self.log, micros=32000)  # two images held
        self.log.status, self.log.http_status, self.log.images_returned = UsageLog.Status.SUCCESS, 200, 1
        self.log.cost_micros, self.log.completed_at = 16000, timezone.now()
        self.log.reserved_micros = 0  # as the request path leaves it: what was not delivered is refunded

    def tearDown(self) -> None:
        journal_replay()

    def lose_connection(self) -> None:
        """The database ends this process's connection, as when it restarts or a proxy drops it."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        with psycopg.connect(database_url(), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", [pid])

    def spent(self) -> int:
        return ApiToken.objects.get(pk=self.token.pk).spent_micros

    def test_a_completion_that_lost_its_connection_is_written_on_a_retry(self) -> None:
        self.lose_connection()
        with self.assertLogs("gateway.usage", "WARNING") as logs:
            self.assertIsNone(usage_finish_retrying(self.log, held=32000, until=time.monotonic() + 10))
        self.assertIn("written after 1 retries", logs.output[0])
        row = UsageLog.objects.get()
        self.assertEqual((row.status, row.images_returned, row.reserved_micros), ("success", 1, 0))
        self.assertEqual(self.spent(), 16000)  # the undelivered image's hold given back, once

    def test_a_retry_finds_a_completion_that_was_committed_and_does_not_repeat_it(self) -> None:
        # As when the commit went through but its answer was lost on the way back.
        usage_finish(self.log, held=32000)
        self.lose_connection()
        self.assertIsNone(usage_finish_retrying(self.log, held=32000, until=time.monotonic() + 10))
        self.assertEqual(self.spent(), 16000)  # not refunded twice

    def test_a_completion_the_database_does_not_take_goes_to_the_journal_and_is_written_from_it(self) -> None:
        with mock.patch("gateway.usage_writers.usage_finish", side_effect=OperationalError("connection refused")):
            with self.assertLogs("gateway.usage", "ERROR") as logs:
                usage_write(self.log, held=32000)
        self.assertIn("kept in", logs.output[0])
        self.assertEqual(UsageLog.objects.get().status, UsageLog.Status.PENDING)
        self.assertEqual(self.spent(), 32000)
        self.assertEqual(usage_sweep(grace=-3600), 0)  # nothing swept while the journal holds rows
        self.assertEqual(journal_replay(), 0)
        self.assertEqual(UsageLog.objects.get().status, UsageLog.Status.SUCCESS)
        self.assertEqual(self.spent(), 16000)
        self.assertEqual(journal_parked(), 0)


class CompletionBatchTests(TransactionTestCase):
    """The usage writers (gunicorn workers on PostgreSQL) write the completions handed to them together: those
    without a refund in one statement, each row still with its own values."""

    def setUp(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        self.token, _key = make_token(budget="1.00")

    def pending(self, request_id: str, *, hold: int = 0) -> UsageLog:
        log = usage_new(token=self.token, endpoint="generations", request_id=request_id)
        usage_body(log, {"prompt": "a"})
        if hold:
            usage_insert_holding(log, micros=hold)
        else:
            usage_insert(log)
        return log

    def completed(self, log: UsageLog, *, images: int, latency_ms: int) -> UsageLog:
        log.status, log.http_status, log.images_returned = UsageLog.Status.SUCCESS, 200, images
        log.cost_micros, log.latency_ms, log.completed_at = 16000 * images, latency_ms, timezone.now()
        log.attempts = [{"channel": None, "outcome": "ok", "latency_ms": latency_ms}]
        log.reserved_micros = 0
        return log

    def rows(self) -> dict[str, tuple[Any, ...]]:
        return {r[0]: r[1:] for r in UsageLog.objects.values_list(
            "request_id", "status", "images_returned", "latency_ms", "cost_micros", "reserved_micros", "attempts")}

    def written_together(self, request_ids: list[str]) -> int:
        """How many transactions wrote these rows last."""
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(DISTINCT xmin::text) FROM gateway_usagelog WHERE request_id = ANY(%s)",
                           [request_ids])
            return int(cursor.fetchone()[0])

    def test_rows_handed_over_together_are_written_together_each_with_its_own_values(self) -> None:
        plain = [self.completed(self.pending(f"req_{i}"), images=i + 1, latency_ms=100 + i) for i in range(3)]
        refunded = self.completed(self.pending("req_refund", hold=32000), images=1, latency_ms=7)
        lost = self.pending("req_lost")  # as after a database crash took its unflushed pending row
        UsageLog.objects.filter(request_id="req_lost").delete()
        self.completed(lost, images=1, latency_ms=9)
        _write_completions([(plain[0], 0), (refunded, 32000), (plain[1], 0), (lost, 0), (plain[2], 0)])
        ok = [{"channel": None, "outcome": "ok", "latency_ms": ms} for ms in (100, 101, 102, 7, 9)]
        self.assertEqual(self.rows(), {
            "req_0": ("success", 1, 100, 16000, 0, [ok[0]]),
            "req_1": ("success", 2, 101, 32000, 0, [ok[1]]),
            "req_2": ("success", 3, 102, 48000, 0, [ok[2]]),
            "req_refund": ("success", 1, 7, 16000, 0, [ok[3]]),
            "req_lost": ("success", 1, 9, 16000, 0, [ok[4]]),
        })
        self.assertEqual(ApiToken.objects.get(pk=self.token.pk).spent_micros, 16000)  # one image of two, once
        self.assertEqual(self.written_together(["req_0", "req_1", "req_2"]), 1)

    def test_a_row_the_database_refuses_fails_alone(self) -> None:
        logs = [self.completed(self.pending(f"req_{i}"), images=1, latency_ms=i) for i in range(3)]
        logs[1].error_code = "x" * 80  # longer than its column: the database refuses the row
        with self.assertLogs("gateway.usage", "ERROR") as logged:
            _write_completions([(log, 0) for log in logs])
        self.assertIn("req_1 refused", logged.output[0])
        self.assertEqual({k: v[0] for k, v in self.rows().items()},
                         {"req_0": "success", "req_1": "pending", "req_2": "success"})  # the sweeper fails req_1
