"""How a request's usage row reaches the database: pending before the provider is called, completed after."""

from __future__ import annotations

import time
import unittest
from typing import Any

import psycopg
from django.db import connection, transaction
from django.test import TransactionTestCase
from django.utils import timezone

from gateway.models import ApiToken, UsageLog
from gateway.usage import usage_body, usage_new
from gateway.usage_sql import _INSERT_VALUES, _statements, _values, usage_finish, usage_insert, usage_insert_holding
from gateway.usage_writers import _write_completions, usage_finish_retrying
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

    def test_on_postgresql_a_pending_row_without_a_hold_skips_the_flush_and_only_its_own_commit_does(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        token, _key = make_token()
        with connection.cursor() as cursor:
            # Within one transaction the pending statement's setting is visible after it...
            with transaction.atomic():
                cursor.execute(_statements(connection.vendor).pending, self.values(token))
                cursor.execute("SELECT current_setting('synchronous_commit')")
                self.assertEqual(cursor.fetchone(), ("off",))
            # ...and, as the gateway sends it (on its own, committed at once), it ends with its commit: the next
            # statement on the connection, a completion or a budget hold, waits for the flush as before.
            usage_insert(usage_new(token=token, endpoint="generations", request_id="req_2"), durable=False)
            cursor.execute("SELECT current_setting('synchronous_commit')")
            self.assertEqual(cursor.fetchone(), ("on",))
        self.assertEqual(UsageLog.objects.filter(status="pending").count(), 2)

    def values(self, token: Any) -> list[Any]:
        log = usage_new(token=token, endpoint="generations", request_id="req_1")
        return _values(log, _INSERT_VALUES, True, connection)


class CompletionRetryTests(TransactionTestCase):
    """A completion written after the answer (gunicorn workers on PostgreSQL) is tried again when the database goes
    away, and never written twice."""

    def setUp(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        self.token, _key = make_token(budget="1.00")
        self.log = usage_new(token=self.token, endpoint="generations", request_id="req_retry")
        usage_body(self.log, {"prompt": "a"})
        usage_insert_holding(self.log, token_id=self.token.pk, micros=32000)  # two images held
        self.log.status, self.log.http_status, self.log.images_returned = UsageLog.Status.SUCCESS, 200, 1
        self.log.cost_micros, self.log.completed_at = 16000, timezone.now()
        self.log.reserved_micros = 0  # as the request path leaves it: what was not delivered is refunded

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
            self.assertTrue(usage_finish_retrying(self.log, refund=(self.token.pk, 16000), until=time.time() + 10))
        self.assertIn("trying again", logs.output[0])
        row = UsageLog.objects.get()
        self.assertEqual((row.status, row.images_returned, row.reserved_micros), ("success", 1, 0))
        self.assertEqual(self.spent(), 16000)  # the undelivered image's hold given back, once

    def test_a_retry_finds_a_completion_that_was_committed_and_does_not_repeat_it(self) -> None:
        # As when the commit went through but its answer was lost on the way back.
        usage_finish(self.log, refund=(self.token.pk, 16000))
        self.lose_connection()
        self.assertTrue(usage_finish_retrying(self.log, refund=(self.token.pk, 16000), until=time.time() + 10))
        self.assertEqual(self.spent(), 16000)  # not refunded twice

    def test_a_completion_gives_up_for_the_sweeper_when_the_database_stays_away(self) -> None:
        self.lose_connection()
        with self.assertLogs("gateway.usage", "ERROR"):
            self.assertFalse(usage_finish_retrying(self.log, refund=(self.token.pk, 16000), until=time.time()))
        self.assertEqual(UsageLog.objects.get().status, UsageLog.Status.PENDING)  # the sweeper fails and refunds it
        self.assertEqual(self.spent(), 32000)


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
            usage_insert_holding(log, token_id=self.token.pk, micros=hold)
        else:
            usage_insert(log, durable=False)
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
        UsageLog.objects.filter(pk=lost.pk).delete()
        self.completed(lost, images=1, latency_ms=9)
        _write_completions([(plain[0], None), (refunded, (self.token.pk, 16000)), (plain[1], None), (lost, None),
                            (plain[2], None)])
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
            _write_completions([(log, None) for log in logs])
        self.assertIn("req_1 not written", logged.output[0])
        self.assertEqual({k: v[0] for k, v in self.rows().items()},
                         {"req_0": "success", "req_1": "pending", "req_2": "success"})  # the sweeper fails req_1
