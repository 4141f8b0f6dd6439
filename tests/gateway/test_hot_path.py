from __future__ import annotations

import base64
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import unittest
from collections.abc import Callable
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections, connection, transaction
from django.http import HttpResponseBase
from django.test import RequestFactory, TransactionTestCase, override_settings
from django.test.utils import CaptureQueriesContext

from channels.models import Channel
from gateway import cache
from gateway.models import ApiToken, key_prefix
from gateway.state import shared_state
from gateway.state.database import DatabaseState
from gateway.state.redis import RedisState
from openopen8.core import http, http_pool
from openopen8.core.errors import UpstreamError
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
            assert_openai_error(self.generate({"model": "dall-e-2", "prompt": "a"}, key=key), 404,
                                "invalid_request_error", "model_not_found", "model")
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
            assert_openai_error(self.generate(self.BODY), 404, "invalid_request_error", "model_not_found", "model")

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
            assert_openai_error(missing[0], 404, "invalid_request_error", "model_not_found", "model")
            # Subscribed again, the process reads what it missed and asks nothing per request.
            eventually(self.state.listening)
            Channel.objects.filter(pk=channel.pk).update(enabled=True)
            self.other_node.bump_config_version()
            eventually(lambda: self.state.versions() == self.other_node.read_versions())
            self.assertEqual(self.commands_of(lambda: self.assertEqual(self.generate(self.BODY).status_code, 200)),
                             {})


class AnswerMemoryTests(ApiTestCase):
    """An answer (megabytes of base64 for a large image) is freed as soon as it is sent. Left in a reference cycle it
    waited for the cyclic garbage collector, and a worker serving large images grew by ~90 MB of RSS."""

    def call(self, body: dict[str, Any]) -> tuple[str, list[HttpResponseBase]]:
        environ = RequestFactory().post("/v1/images/generations", json.dumps(body), content_type="application/json",
                                        headers={"Authorization": f"Bearer {self.key}"}).environ
        status: list[str] = []

        def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(line)
        # As Django's test client does: the test's database connection (and its transaction) must stay open.
        signals.request_started.disconnect(close_old_connections)
        signals.request_finished.disconnect(close_old_connections)
        gc.collect()
        gc.disable()
        try:
            answer = WSGIHandler()(environ, start_response)
            b"".join(answer)
            answer.close()  # what the server does once the body is sent
            del answer
            gc.set_debug(gc.DEBUG_SAVEALL)  # keep what only the cyclic collector would have freed, to look at it
            gc.collect()
            stranded = [o for o in gc.garbage if isinstance(o, HttpResponseBase)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            signals.request_started.connect(close_old_connections)
            signals.request_finished.connect(close_old_connections)
        return status[0], stranded

    def test_answers_are_freed_once_sent(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url)
            status, stranded = self.call({"model": "dall-e-2", "prompt": "a", "n": 2, "response_format": "b64_json"})
        self.assertEqual(status, "200 OK")
        self.assertEqual(stranded, [])

    def test_error_answers_are_freed_once_sent(self) -> None:
        status, stranded = self.call({"model": "dall-e-2", "prompt": ""})
        self.assertTrue(status.startswith("400"), status)
        self.assertEqual(stranded, [])


class ProviderConnectionTests(ApiTestCase):
    def test_calls_from_different_threads_reuse_one_warm_provider_connection(self) -> None:
        # Request threads take turns; with a connection per thread, each turn to a real provider could cost a new
        # TCP and TLS handshake. The process's pool hands the warm connection to whichever thread calls next.
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            request = http.UpstreamRequest("POST", f"{up.url}/v1/images/generations", json={"prompt": "a"})
            for _ in range(3):
                thread = threading.Thread(target=http.send, args=(request,), kwargs={"timeout": 5})
                thread.start()
                thread.join()
        self.assertEqual(len(up.requests), 3)
        self.assertEqual(len({r.client_port for r in up.requests}), 1, [r.client_port for r in up.requests])

    @override_settings(OPENOPEN8_MAX_UPSTREAM_BYTES=2000)
    def test_a_connection_left_with_part_of_an_answer_is_not_used_again(self) -> None:
        # An answer over the cap is abandoned half read; the rest of it must not be taken for the next answer.
        with FakeUpstream() as up:
            request = http.UpstreamRequest("POST", f"{up.url}/v1/images/generations", json={"prompt": "a"})
            up.queue(200, {"data": [{"b64_json": "A" * 500_000}]})
            up.queue(200, {"created": 2, "data": []})
            with self.assertRaisesMessage(UpstreamError, "2000-byte cap"):
                http.send(request, timeout=5)
            answer = http.send(request, timeout=5)
        self.assertEqual((answer.status, answer.json()), (200, {"created": 2, "data": []}))
        self.assertEqual(len({r.client_port for r in up.requests}), 2)

    def test_credentials_in_a_provider_url_are_sent_as_basic_auth(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            url = up.url.replace("http://", "http://webui:p%40ss@") + "/sdapi/v1/txt2img?x=1"
            http.send(http.UpstreamRequest("POST", url, json={"prompt": "a"}), timeout=5)
        self.assertEqual(up.requests[0].headers["Authorization"], "Basic " + base64.b64encode(b"webui:p@ss").decode())
        self.assertEqual(up.requests[0].path, "/sdapi/v1/txt2img?x=1")

    def test_pools_are_kept_for_at_most_max_origins_providers(self) -> None:
        # A gateway with many channels keeps a bounded number of provider pools; the oldest is closed to make room.
        first = http_pool.provider_pool("http://127.0.0.1:1")
        for port in range(2, http_pool.MAX_ORIGINS + 2):
            http_pool.provider_pool(f"http://127.0.0.1:{port}")
        self.assertEqual(len(http_pool.pool_origins()), http_pool.MAX_ORIGINS)
        self.assertNotIn("http://127.0.0.1:1", http_pool.pool_origins())
        self.assertIsNone(first.pool)  # closed: its idle connections are gone

    def test_a_connection_the_provider_closed_while_idle_is_not_used_again(self) -> None:
        # A provider closes keep-alive connections it finds idle; the next call must take a new one, not send its
        # request into the closed one (where it would fail, or be taken for a fault of the provider's).
        answer = json.dumps(openai_images(1)).encode()
        served: list[int] = []
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.settimeout(10)

            def provider() -> None:
                for _ in range(2):
                    peer, address = server.accept()
                    with peer:
                        peer.recv(65536)
                        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
                        served.append(address[1])
                        # Closed once answered, without saying so: the connection stays in the gateway's pool.

            thread = threading.Thread(target=provider, daemon=True)
            thread.start()
            request = http.UpstreamRequest("POST", f"http://127.0.0.1:{server.getsockname()[1]}/v1/images/generations",
                                           json={"prompt": "a"})
            first = http.send(request, timeout=5)
            eventually(lambda: len(served) == 1)
            time.sleep(0.05)  # the close reaches the gateway's side of the connection
            second = http.send(request, timeout=5)
            thread.join(5)
        self.assertEqual([first.status, second.status], [200, 200])
        self.assertEqual(len(set(served)), 2)  # two connections: the closed one was not reused

    def test_checking_a_pooled_connection_gives_no_other_request_of_a_gevent_worker_a_turn(self) -> None:
        # Under gevent (the production worker) urllib3's own check, a poll that should not wait, still let every
        # other request of the worker run first: 30-66 ms at the start of each provider call under load
        # (bench/RESULTS.md). The provider pool's connections check without yielding. Run in a process of its own,
        # patched by gevent as a worker is.
        script = """if True:
            import json, socket
            from gevent import monkey
            monkey.patch_all()
            import django, gevent
            django.setup()
            from urllib3.connection import HTTPConnection
            from openopen8.core import http_pool
            server = socket.create_server(("127.0.0.1", 0))
            conn = http_pool.provider_pool(f"http://127.0.0.1:{server.getsockname()[1]}")._new_conn()
            conn.connect()
            peer, _ = server.accept()
            seen = {}
            checks = (("urllib3", HTTPConnection.is_connected.fget), ("provider pool", type(conn).is_connected.fget))
            for name, check in checks:
                ran = []
                gevent.spawn(ran.append, "another request")
                seen[name] = {"open": check(conn), "others ran meanwhile": bool(ran)}
                gevent.sleep(0)
            peer.close()
            gevent.sleep(0.05)
            seen["after the provider closed it"] = type(conn).is_connected.fget(conn)
            print(json.dumps(seen))
        """
        out = subprocess.run([sys.executable, "-c", script], cwd=settings.BASE_DIR, capture_output=True, text=True,
                             timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "openopen8.settings"})
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        self.assertEqual(json.loads(out.stdout), {
            "urllib3": {"open": True, "others ran meanwhile": True},  # what the check replaces
            "provider pool": {"open": True, "others ran meanwhile": False},
            "after the provider closed it": False,
        })
