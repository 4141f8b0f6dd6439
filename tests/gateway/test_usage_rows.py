"""How a request's usage row reaches the database: pending before the provider is called, completed after."""

from __future__ import annotations

import unittest
from typing import Any

from django.db import connection, transaction
from django.test import TransactionTestCase

from gateway.models import UsageLog
from gateway.usage import _INSERT_VALUES, _statements, _values, usage_insert, usage_new
from tests.base import post_json
from tests.factories import make_channel, make_token, openai_images
from tests.fake_upstream import FakeUpstream, Recorded


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
            usage_insert(usage_new(token=token, endpoint="generations", request_id="req_2", body={}), durable=False)
            cursor.execute("SELECT current_setting('synchronous_commit')")
            self.assertEqual(cursor.fetchone(), ("on",))
        self.assertEqual(UsageLog.objects.filter(status="pending").count(), 2)

    def values(self, token: Any) -> list[Any]:
        log = usage_new(token=token, endpoint="generations", request_id="req_1", body={})
        return _values(log, _INSERT_VALUES, True, connection)
