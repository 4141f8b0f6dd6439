from __future__ import annotations

import threading
import time
import unittest
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.test import TestCase, override_settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from channels.models import Channel
from gateway.models import ApiToken, UsageLog
from gateway.state import LeaseAsk, Window, shared_state
from gateway.state.database import DatabaseState
from gateway.state.redis import RedisState
from gateway.sweeper import usage_sweep
from tests.base import ApiTestCase, clear_of_minute_boundary
from tests.factories import make_channel, make_token, make_usage_log, openai_images
from tests.fake_upstream import FakeUpstream


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


class MetricsTests(ApiTestCase):
    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        r = self.client.get("/metrics")
        self.assertEqual(r.status_code, 200)
        self.assertTrue(r["Content-Type"].startswith("text/plain"))
        return samples(r.content.decode())

    def test_requests_images_latency_errors_circuits_and_refusals_are_exposed(self) -> None:
        _poor, poor_key = make_token(name="poor", budget="0")
        with FakeUpstream() as bad, FakeUpstream() as good:
            bad.respond(500, {"error": {"message": "x"}})
            good.respond(200, openai_images(2))
            make_channel(name="flaky-one", base_url=bad.url, priority=1)
            make_channel(name="steady-one", base_url=good.url)
            before = self.scrape()
            self.generate({"model": "dall-e-2", "prompt": "a", "n": 2, "response_format": "b64_json"})
            self.generate({"model": "dall-e-2", "prompt": "a"}, key=poor_key)
            after = self.scrape()

        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return after.get(key, 0) - before.get(key, 0)

        ok = {"endpoint": "generations", "model": "dall-e-2", "channel": "steady-one"}
        self.assertEqual(delta("openopen8_requests_total", **ok, status="200"), 1)
        self.assertEqual(delta("openopen8_images_total", **ok), 2)
        self.assertEqual(delta("openopen8_provider_errors_total", channel="flaky-one", code="upstream_error"), 1)
        self.assertEqual(delta("openopen8_budget_refusals_total"), 1)
        self.assertEqual(delta("openopen8_requests_total", endpoint="generations", model="unserved", channel="",
                               status="429"), 1)
        self.assertEqual(delta("openopen8_request_duration_seconds_count", endpoint="generations"), 2)
        self.assertEqual(delta("openopen8_provider_duration_seconds_count", channel="steady-one"), 1)
        self.assertEqual(after[("openopen8_circuit_state", (("channel", "flaky-one"),))], 0)

    @override_settings(OPENOPEN8_BREAKER_THRESHOLD=1, OPENOPEN8_BREAKER_COOLDOWN=60)
    def test_an_open_circuit_shows_as_2(self) -> None:
        channel = make_channel(name="down-one", base_url="http://127.0.0.1:9")
        shared_state().circuit_failed(channel.pk)
        self.assertEqual(self.scrape()[("openopen8_circuit_state", (("channel", "down-one"),))], 2)


class HealthTests(TestCase):
    def test_healthz_and_readyz_answer_without_a_key(self) -> None:
        self.assertEqual(self.client.get("/healthz").json(), {"status": "ok"})
        ready = self.client.get("/readyz")
        self.assertEqual(ready.status_code, 200)
        self.assertEqual(ready.json()["checks"]["database"], "ok")

    @override_settings(REDIS_URL="redis://127.0.0.1:1/0")
    def test_readyz_is_503_when_redis_is_configured_but_down(self) -> None:
        ready = self.client.get("/readyz")
        self.assertEqual(ready.status_code, 503)
        self.assertTrue(ready.json()["checks"]["redis"].startswith("error"))


class SweeperTests(TestCase):
    def test_an_abandoned_request_is_failed_and_refunded_once(self) -> None:
        token, _ = make_token(budget="1")
        ApiToken.objects.filter(pk=token.pk).update(spent_micros=60000)
        stale = make_usage_log(token=token, status="pending", reserved_micros=40000,
                               created_at=timezone.now() - timedelta(hours=1))
        fresh = make_usage_log(token=token, status="pending", reserved_micros=20000)
        self.assertEqual(usage_sweep(), 1)
        self.assertEqual(usage_sweep(), 0)
        stale.refresh_from_db()
        self.assertEqual((stale.status, stale.error_code, stale.reserved_micros), ("error", "abandoned", 0))
        self.assertEqual(UsageLog.objects.get(pk=fresh.pk).status, "pending")
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 20000)

    def test_the_sweep_command_reports_what_it_did(self) -> None:
        from io import StringIO

        from django.core.management import call_command

        out = StringIO()
        call_command("sweep", stdout=out)
        self.assertIn("Swept 0 abandoned request(s).", out.getvalue())


class AdmissionTests(TestCase):
    def test_a_request_refused_by_one_limit_uses_up_nothing_of_the_other(self) -> None:
        for state in {type(s): s for s in (DatabaseState(), shared_state())}.values():  # Redis too, where configured
            with self.subTest(type(state).__name__):
                clear_of_minute_boundary()
                rpm, places = Window(f"rpm:{uuid.uuid4().hex}", 1, 2), f"inflight:{uuid.uuid4().hex}"
                first = state.admit(window=rpm, lease=LeaseAsk(places, 1, 30))
                self.assertEqual((first.refused, bool(first.lease_id)), (None, True))
                # The one place is taken: refused, and not counted against the minute's two.
                self.assertEqual(state.admit(window=rpm, lease=LeaseAsk(places, 1, 30)).refused, "lease")
                state.release(places, str(first.lease_id))
                self.assertIsNone(state.admit(window=rpm, lease=LeaseAsk(places, 2, 30)).refused)  # the second of two
                full = state.admit(window=rpm, lease=LeaseAsk(places, 2, 30))
                self.assertEqual(full.refused, "window")
                self.assertTrue(0 < full.wait <= 60)
                # The request the window refused took no place: one is still free of two.
                self.assertIsNotNone(state.admit(window=None, lease=LeaseAsk(places, 2, 30)).lease_id)


class DatabaseStateTests(TestCase):
    """The database backend on its own (the suite runs the Redis one wherever REDIS_URL is set)."""

    def test_windows_leases_and_circuits(self) -> None:
        state = DatabaseState()
        self.assertIsNone(state.admit(window=Window("w", 2, 3), lease=None).refused)
        self.assertIsNone(state.admit(window=Window("w", 1, 3), lease=None).refused)
        full = state.admit(window=Window("w", 1, 3), lease=None)
        self.assertTrue(full.refused == "window" and 0 < full.wait <= 60)
        first = state.admit(window=None, lease=LeaseAsk("l", 1, 0.2)).lease_id
        self.assertIsNotNone(first)
        self.assertIsNone(state.admit(window=None, lease=LeaseAsk("l", 1, 0.2)).lease_id)
        time.sleep(0.25)  # a lease whose worker died lapses
        self.assertIsNotNone(state.admit(window=None, lease=LeaseAsk("l", 1, 5)).lease_id)
        channel = make_channel(base_url="http://127.0.0.1:9")
        with override_settings(OPENOPEN8_BREAKER_THRESHOLD=2, OPENOPEN8_BREAKER_COOLDOWN=0.1):
            state.circuit_failed(channel.pk)
            self.assertEqual(state.circuits([channel.pk])[channel.pk].state(time.time()), "closed")
            state.circuit_failed(channel.pk)
            self.assertEqual(state.circuits([channel.pk])[channel.pk].state(time.time()), "open")
            time.sleep(0.12)
            self.assertTrue(state.claim_probe(channel.pk, ttl=5))
            self.assertFalse(state.claim_probe(channel.pk, ttl=5))  # only one probe at a time
            state.circuit_ok(channel.pk)
            self.assertEqual(state.circuits([channel.pk]), {})


class RedisPoolTests(TestCase):
    def test_a_process_keeps_its_redis_connections_bounded_and_calls_beyond_them_wait(self) -> None:
        # Hundreds of requests in flight in one worker must neither open a Redis connection each nor fail with
        # "Too many connections" when they outnumber the pool: they take turns on the pool's connections.
        if not settings.REDIS_URL:
            raise unittest.SkipTest("needs REDIS_URL, as .ci/run sets it")
        name = f"oo8-pool-test-{time.monotonic_ns()}"
        url = settings.REDIS_URL + ("&" if "?" in settings.REDIS_URL else "?") + f"client_name={name}"
        with override_settings(OPENOPEN8_REDIS_POOL_SIZE=2):
            state = RedisState(url)
        self.addCleanup(state.redis.connection_pool.disconnect)
        errors: list[BaseException] = []
        barrier = threading.Barrier(24)

        def one() -> None:
            barrier.wait()
            try:
                for _ in range(10):
                    state.admit(window=Window("pool-test", 1, 1000), lease=None)
            except BaseException as error:  # noqa: BLE001 - collected for the assertion below
                errors.append(error)

        threads = [threading.Thread(target=one) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        # All 240 calls were counted: the window of 240 is full.
        self.assertEqual(state.admit(window=Window("pool-test", 1, 240), lease=None).refused, "window")
        clients = [c for c in state.redis.client_list() if c.get("name") == name]
        self.assertLessEqual(len(clients), 2)


class ChannelTestActionTests(TestCase):
    def setUp(self) -> None:
        self.client.force_login(User.objects.create_superuser("root", "r@example.com", "pw"))

    def act(self, action: str, channel: Channel) -> str:
        r = self.client.post("/admin/channels/channel/", {"action": action, "_selected_action": [channel.pk]},
                             follow=True)
        return r.content.decode()

    def test_the_cheap_probe_asks_for_the_model_list_with_each_key_and_records_the_result(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, lambda req: (200, {"data": []}) if req.headers["Authorization"].endswith("good-0001")
                       else (401, {"error": {"message": "bad key"}}))
            channel = make_channel(base_url=up.url + "/v1", api_key="sk-key-good-0001\nsk-key-bad-00002")
            page = self.act("test_probe", channel)
        self.assertEqual([(r.method, r.path) for r in up.requests], [("GET", "/v1/models")] * 2)
        self.assertIn("key …0001: answered in", page)
        self.assertIn("key …0002: The provider rejected the channel&#x27;s credentials", page)
        self.assertNotIn("sk-key-bad-00002", page)
        channel.refresh_from_db()
        self.assertFalse(channel.last_test_ok)
        self.assertIsNotNone(channel.last_test_latency_ms)
        self.assertIn("…0001: answered", channel.last_test_message)

    def test_the_real_test_makes_one_smallest_image(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            channel = make_channel(base_url=up.url, models="dall-e-3,dall-e-2")
            page = self.act("test_generation", channel)
        body = up.requests[0].json()
        self.assertEqual((body["model"], body["size"], body["n"]), ("dall-e-3", "1024x1024", 1))
        self.assertIn("1 image(s) from dall-e-3", page)
        channel.refresh_from_db()
        self.assertTrue(channel.last_test_ok)
