"""The per-process caches behind the configuration and circuits versions (gateway/cache.py): what a warm request
reads, and how a change anywhere reaches it."""

from __future__ import annotations

import threading
import time
import unittest
from collections.abc import Callable
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test import TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext

from channels.models import Channel
from gateway import cache
from gateway.models import ApiToken, key_prefix
from gateway.state import shared_state
from gateway.state.database import DatabaseState
from gateway.state.redis import RedisState
from tests.base import ApiTestCase, assert_openai_error, eventually, post_json
from tests.factories import make_channel, make_price, make_token, openai_images
from tests.fake_upstream import FakeUpstream


class HotPathTests(ApiTestCase):
    def test_a_request_makes_a_fixed_small_number_of_queries(self) -> None:
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        _token, key = make_token(name="budgeted", budget="10")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url)
            body = {"model": "dall-e-2", "prompt": "a", "size": "256x256", "response_format": "b64_json"}
            self.generate(body, key=key)  # warms the process's caches
            with CaptureQueriesContext(connection) as queries:
                r = self.generate(body, key=key)
        self.assertEqual(r.status_code, 200)
        statements = [q["sql"].split()[0].upper() for q in queries.captured_queries]
        # Reads: the configuration and circuits versions, in one statement unless Redis holds them (then none); the
        # circuits themselves come from the process's cache. Writes: the pending usage row with the budget hold (one
        # statement on PostgreSQL), and the completed row. No token, channel or price lookups, and no per-request
        # channel write.
        self.assertEqual(statements.count("SELECT"), 0 if settings.REDIS_URL else 1, queries.captured_queries)
        writes = ["WITH", "UPDATE"] if connection.vendor == "postgresql" else ["INSERT", "UPDATE", "UPDATE"]
        self.assertEqual([s for s in statements if s in ("UPDATE", "INSERT", "WITH")], writes,
                         queries.captured_queries)

    def test_on_postgresql_the_usage_row_statements_are_prepared_once(self) -> None:
        if connection.vendor != "postgresql":
            raise unittest.SkipTest("PostgreSQL only (DATABASE_URL, as .ci/run sets it)")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url)
            for _ in range(6):
                self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}).status_code, 200)
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [row[0].split(" (")[0].split(" SET")[0] for row in cursor.fetchall()]
        # The pending row and its completion: parsed and planned once on this connection, then only executed.
        self.assertIn('INSERT INTO "gateway_usagelog"', prepared)
        self.assertIn('UPDATE "gateway_usagelog"', prepared)

    def test_operator_changes_reach_the_cached_path_at_once(self) -> None:
        token, key = make_token(name="cached")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            channel = make_channel(base_url=up.url)
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}, key=key).status_code, 200)
            channel.enabled = False
            channel.save()
            assert_openai_error(self.generate({"model": "dall-e-2", "prompt": "a"}, key=key), 503,
                                "server_error", "model_unavailable")
            Channel.objects.filter(pk=channel.pk).update(enabled=True)  # a bulk update: no signal...
            self.client.force_login(self.superuser())
            self.client.post("/admin/gateway/apitoken/", {"action": "disable", "_selected_action": [token.pk]})
            self.client.logout()
            # ...but the admin's bulk action announced its change, so both the token and the channel are re-read.
            assert_openai_error(self.generate({"model": "dall-e-2", "prompt": "a"}, key=key), 401,
                                "invalid_request_error", "invalid_api_key")
            token = ApiToken.objects.get(pk=token.pk)
            token.enabled = True
            token.save()
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}, key=key).status_code, 200)

    def superuser(self) -> User:
        return User.objects.create_superuser("root", "r@example.com", "pw")


class ChangeInTransactionTests(TransactionTestCase):
    def test_a_key_read_by_another_request_before_its_change_commits_is_not_kept(self) -> None:
        # The admin saves inside a transaction. A request elsewhere that reads the key between the save and the
        # commit sees the old row; the cache must not go on serving that row once the change is committed.
        token, key = make_token(name="late")

        def another_request() -> None:
            try:
                found = cache.config_snapshot().tokens_with_prefix(key_prefix(key))
                self.assertTrue(found and found[0].enabled)  # the change is not committed yet
            finally:
                connection.close()

        with transaction.atomic():
            token.enabled = False
            token.save()
            reader = threading.Thread(target=another_request)
            reader.start()
            reader.join()
        assert_openai_error(post_json(self.client, "/v1/images/generations", {"model": "dall-e-2", "prompt": "a"},
                                      key), 401, "invalid_request_error", "invalid_api_key")


@override_settings(OPENOPEN8_BREAKER_THRESHOLD=2)
class DatabaseHotPathTests(ApiTestCase):
    """Without Redis the database holds the versions: a warm request reads them in one statement and keeps the
    circuits it read until another process moves the circuits version."""

    BODY = {"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"}

    def setUp(self) -> None:
        if settings.REDIS_URL:
            raise unittest.SkipTest("without REDIS_URL only (Redis holds the versions otherwise)")
        super().setUp()

    def test_a_circuit_opened_by_another_process_is_seen_by_the_next_request(self) -> None:
        with FakeUpstream() as first, FakeUpstream() as backup:
            first.respond(200, openai_images(1))
            backup.respond(200, openai_images(1))
            channel = make_channel(base_url=first.url, priority=1)
            make_channel(base_url=backup.url, priority=0)
            self.assertEqual(self.generate(self.BODY).status_code, 200)  # the circuits are cached now
            other_process = DatabaseState()
            for _ in range(2):
                opened = other_process.circuit_failed(channel.pk)
            self.assertEqual(self.generate(self.BODY).status_code, 200)
            self.assertEqual(opened.state(time.time()), "open")
            self.assertEqual((len(first.requests), len(backup.requests)), (1, 1))
            # Closed again by another process (a probe that worked): the next request goes back to the first channel.
            other_process.circuit_ok(channel.pk)
            self.assertEqual(self.generate(self.BODY).status_code, 200)
            self.assertEqual((len(first.requests), len(backup.requests)), (2, 1))


@override_settings(OPENOPEN8_BREAKER_THRESHOLD=2)
class RedisHotPathTests(ApiTestCase):
    """With Redis, each process holds the configuration and circuits versions from a subscription to their changes:
    a warm request asks Redis nothing, and a change on another node still reaches it."""

    BODY = {"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"}

    def setUp(self) -> None:
        if not settings.REDIS_URL:
            raise unittest.SkipTest("needs REDIS_URL, as .ci/run sets it")
        super().setUp()
        self.state = cast(RedisState, shared_state())
        self.state.listen()  # as a worker does when it starts (openopen8/runtime.py)
        self.other_node = RedisState(settings.REDIS_URL)  # the same Redis, its own process-local view
        # Each test starts from an emptied Redis: the first read starts a circuits version, and this process hears it.
        eventually(lambda: self.state.listening() and self.state.versions() == self.other_node.read_versions())

    def commands(self) -> dict[str, int]:
        stats = self.state.redis.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def commands_of(self, call: Callable[[], Any]) -> dict[str, int]:
        before = self.commands()
        call()
        after = self.commands()
        return {c: n - before.get(c, 0) for c, n in after.items() if n != before.get(c, 0) and c != "info"}

    def test_a_warm_request_asks_redis_nothing_and_sees_a_circuit_opened_on_another_node(self) -> None:
        with FakeUpstream() as first, FakeUpstream() as backup:
            first.respond(200, openai_images(1))
            backup.respond(200, openai_images(1))
            channel = make_channel(base_url=first.url, priority=1)
            make_channel(base_url=backup.url, priority=0)
            self.assertEqual(self.generate(self.BODY).status_code, 200)  # warms the process's caches
            self.assertEqual(self.commands_of(lambda: self.assertEqual(self.generate(self.BODY).status_code, 200)),
                             {})
            for _ in range(2):  # another node counts faults until the circuit opens
                opened = self.other_node.circuit_failed(channel.pk)
            eventually(lambda: self.state.versions() == self.other_node.read_versions())
            self.assertEqual(self.generate(self.BODY).status_code, 200)
        self.assertEqual(opened.state(time.time()), "open")
        self.assertEqual((len(first.requests), len(backup.requests)), (2, 1))

    def test_an_operator_change_on_another_node_reaches_this_one(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            channel = make_channel(base_url=up.url)
            self.assertEqual(self.generate(self.BODY).status_code, 200)
            Channel.objects.filter(pk=channel.pk).update(enabled=False)  # no signal: this process is not told
            self.other_node.bump_config_version()  # ...but another node announces the change
            eventually(lambda: self.state.versions() == self.other_node.read_versions())
            assert_openai_error(self.generate(self.BODY), 503, "server_error", "model_unavailable")

    def test_while_the_subscription_is_lost_requests_read_the_versions_themselves(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            channel = make_channel(base_url=up.url)
            self.assertEqual(self.generate(self.BODY).status_code, 200)
            self.state.redis.client_kill_filter(_type="pubsub")
            eventually(lambda: not self.state.listening())
            # A change announced while nobody listens is not missed: each request reads the versions.
            Channel.objects.filter(pk=channel.pk).update(enabled=False)
            self.other_node.bump_config_version()
            missing: list[Any] = []
            self.assertEqual(self.commands_of(lambda: missing.append(self.generate(self.BODY))), {"mget": 1})
            assert_openai_error(missing[0], 503, "server_error", "model_unavailable")
            # Subscribed again, the process reads what it missed and asks nothing per request.
            eventually(self.state.listening)
            Channel.objects.filter(pk=channel.pk).update(enabled=True)
            self.other_node.bump_config_version()
            eventually(lambda: self.state.versions() == self.other_node.read_versions())
            self.assertEqual(self.commands_of(lambda: self.assertEqual(self.generate(self.BODY).status_code, 200)),
                             {})
