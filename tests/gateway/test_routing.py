from __future__ import annotations

import os
import threading
import time
from typing import Any

import openai
import requests
from django.test import LiveServerTestCase, override_settings

from channels.models import Channel, key_fingerprint
from gateway.models import ApiToken, UsageLog
from gateway.state import shared_state
from tests.base import ApiTestCase, assert_openai_error, clear_of_minute_boundary
from tests.factories import make_channel, make_token, openai_images, restore_default_prices
from tests.fake_upstream import FakeUpstream, Recorded
from tests.processes import start_gateway

OK = openai_images(1)
BROKEN = {"error": {"message": "internal error"}}


@override_settings(OPENOPEN8_BREAKER_THRESHOLD=2, OPENOPEN8_BREAKER_COOLDOWN=0.3)
class CircuitBreakerTests(ApiTestCase):
    def ask(self) -> Any:
        return self.generate({"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"})

    def test_it_trips_skips_and_recovers_through_a_single_probe(self) -> None:
        with FakeUpstream() as flaky, FakeUpstream() as backup:
            flaky.respond(500, BROKEN)
            backup.respond(200, OK)
            channel = make_channel(base_url=flaky.url, priority=10)
            make_channel(base_url=backup.url, priority=0)
            for _ in range(2):
                self.assertEqual(self.ask().status_code, 200)
            self.assertEqual(len(flaky.requests), 2)
            self.assertEqual(shared_state().circuits([channel.pk])[channel.pk].state(time.time()), "open")
            for _ in range(3):  # open: skipped, the backup serves
                self.assertEqual(self.ask().status_code, 200)
            self.assertEqual(len(flaky.requests), 2)
            time.sleep(0.35)
            flaky.respond(200, OK)
            self.assertEqual(self.ask().status_code, 200)  # the probe
            self.assertEqual(len(flaky.requests), 3)
            self.assertNotIn(channel.pk, shared_state().circuits([channel.pk]))  # closed again
            self.ask()
            self.assertEqual(len(flaky.requests), 4)

    def test_a_failed_probe_opens_it_again_for_longer(self) -> None:
        with FakeUpstream() as flaky, FakeUpstream() as backup:
            flaky.respond(500, BROKEN)
            backup.respond(200, OK)
            channel = make_channel(base_url=flaky.url, priority=10)
            make_channel(base_url=backup.url, priority=0)
            self.ask()
            self.ask()
            time.sleep(0.35)
            self.ask()  # probe fails
            view = shared_state().circuits([channel.pk])[channel.pk]
            self.assertEqual(view.trips, 2)
            assert view.open_until is not None
            self.assertGreater(view.open_until - time.time(), 0.4)  # 0.6 s: twice the first cool-down
        self.assertEqual(len(flaky.requests), 3)

    def test_when_every_channel_is_open_the_client_gets_503_with_retry_after(self) -> None:
        with FakeUpstream() as flaky:
            flaky.respond(500, BROKEN)
            make_channel(base_url=flaky.url)
            self.ask()
            self.ask()
            r = self.ask()
        assert_openai_error(r, 503, "server_error", "service_unavailable")
        self.assertEqual(r["Retry-After"], "1")
        self.assertEqual(len(flaky.requests), 2)

    def test_the_clients_faults_and_rate_limits_do_not_trip_it(self) -> None:
        with FakeUpstream() as up:
            up.respond(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "7"})
            channel = make_channel(base_url=up.url)
            for _ in range(3):
                r = self.ask()
            assert_openai_error(r, 503, "server_error", "service_unavailable")
            self.assertEqual(r["Retry-After"], "7")
            up.respond(400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}})
            for _ in range(3):
                self.assertEqual(self.ask().status_code, 400)
        self.assertEqual(shared_state().circuits([channel.pk]), {})


class KeyTests(ApiTestCase):
    def test_a_rejected_key_is_set_aside_while_the_channels_other_key_keeps_serving(self) -> None:
        def provider(request: Recorded) -> Any:
            if request.headers["Authorization"] == "Bearer sk-bad-key-00000001":
                return 401, {"error": {"message": "Incorrect API key provided: sk-bad-key-00000001",
                                       "type": "invalid_request_error", "code": "invalid_api_key"}}
            return OK

        with FakeUpstream() as up:
            up.respond(200, provider)
            channel = make_channel(base_url=up.url, api_key="sk-bad-key-00000001\nsk-good-key-0000002")
            answers = [self.generate({"model": "dall-e-2", "prompt": "a"}).status_code for _ in range(4)]
        self.assertEqual(answers, [200] * 4)
        used = [r.headers["Authorization"] for r in up.requests]
        self.assertEqual(used.count("Bearer sk-bad-key-00000001"), 1)
        self.assertEqual(used[used.index("Bearer sk-bad-key-00000001") + 1:],
                         ["Bearer sk-good-key-0000002"] * (len(used) - used.index("Bearer sk-bad-key-00000001") - 1))
        channel.refresh_from_db()
        self.assertTrue(channel.enabled)
        self.assertEqual(list(channel.disabled_keys), [key_fingerprint("sk-bad-key-00000001")])
        self.assertNotIn("sk-bad-key-00000001", str(channel.disabled_keys))
        self.assertIn("(set aside)", channel.masked_key)

    def test_a_channel_whose_only_key_is_rejected_is_disabled_with_the_reason(self) -> None:
        with FakeUpstream() as rejecting, FakeUpstream() as backup:
            rejecting.respond(403, {"error": {"message": "This key is revoked."}})
            backup.respond(200, OK)
            channel = make_channel(base_url=rejecting.url, priority=5)
            make_channel(base_url=backup.url)
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}).status_code, 200)
            self.generate({"model": "dall-e-2", "prompt": "a"})
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)
        self.assertIn("This key is revoked.", channel.disabled_reason)
        # No code names the key, so a probe of it (the model list) decided: refused too.
        self.assertEqual([(r.method, r.path) for r in rejecting.requests], [("POST", "/images/generations"),
                                                                             ("GET", "/models")])

    def test_a_key_named_bad_by_the_providers_code_is_set_aside_without_a_probe(self) -> None:
        with FakeUpstream() as up:
            up.respond(401, {"error": {"message": "Incorrect API key provided.", "code": "invalid_api_key"}})
            channel = make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
            assert_openai_error(r, 502, "server_error", "upstream_error")
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)
        self.assertEqual([r.method for r in up.requests], ["POST"])

    def test_a_refusal_of_one_request_by_a_working_key_goes_to_the_client_and_the_key_keeps_serving(self) -> None:
        # As OpenAI refuses some models to organisations that are not verified: 403, the key fine for the rest.
        def provider(request: Recorded) -> Any:
            if request.method == "GET":
                return 200, {"object": "list", "data": [{"id": "dall-e-2", "object": "model"}]}
            if request.json()["prompt"] == "refused":
                return 403, {"error": {"message": "Your organization must be verified to use this model.",
                                       "type": "invalid_request_error", "code": None}}
            return OK

        with FakeUpstream() as up:
            up.respond(200, provider)
            channel = make_channel(base_url=up.url)
            refused = self.generate({"model": "dall-e-2", "prompt": "refused"})
            error = assert_openai_error(refused, 403, "invalid_request_error", "upstream_permission_denied")
            self.assertIn("must be verified", error["message"])
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}).status_code, 200)
        channel.refresh_from_db()
        self.assertEqual((channel.enabled, channel.disabled_keys), (True, {}))

    def test_without_a_probe_a_key_is_set_aside_only_when_refusals_repeat(self) -> None:
        with FakeUpstream() as up:
            up.respond(403, {"code": "AccessDenied", "message": "Access denied.", "request_id": "r"})
            channel = make_channel(kind="dashscope", base_url=up.url, models="wan2.5-t2i-preview")
            answers = [self.generate({"model": "wan2.5-t2i-preview", "prompt": "a"}).status_code for _ in range(3)]
        self.assertEqual(answers, [403, 403, 502])
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)


class LimitTests(ApiTestCase):
    def test_a_tokens_requests_per_minute_are_answered_429_with_retry_after(self) -> None:
        _token, key = make_token(name="limited", requests_per_minute=2)
        make_channel(kind="placeholder")
        clear_of_minute_boundary()
        answers = [self.generate({"model": "dall-e-2", "prompt": "a", "size": "256x256"}, key=key) for _ in range(3)]
        self.assertEqual([a.status_code for a in answers[:2]], [200, 200])
        assert_openai_error(answers[2], 429, "requests", "rate_limit_exceeded")
        self.assertTrue(1 <= int(answers[2]["Retry-After"]) <= 60)
        self.assertEqual(UsageLog.objects.filter(http_status=429).count(), 1)

    def test_a_channels_images_per_minute_send_the_rest_elsewhere_or_back_with_retry_after(self) -> None:
        with FakeUpstream() as capped, FakeUpstream() as other:
            capped.respond(200, openai_images(2))
            other.respond(200, openai_images(2))
            make_channel(base_url=capped.url, priority=5, images_per_minute=3)
            clear_of_minute_boundary()
            self.generate({"model": "dall-e-2", "prompt": "a", "n": 2})
            self.generate({"model": "dall-e-2", "prompt": "a", "n": 2})  # 4 > 3: not sent to the capped channel
            self.assertEqual((len(capped.requests), len(other.requests)), (1, 0))
            only_capped = self.generate({"model": "dall-e-2", "prompt": "a", "n": 2})
            assert_openai_error(only_capped, 429, "requests", "rate_limit_exceeded")
            self.assertIn("Retry-After", only_capped)
            make_channel(base_url=other.url, priority=0)
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a", "n": 2}).status_code, 200)
            self.assertEqual((len(capped.requests), len(other.requests)), (1, 1))


class ConcurrencyLimitTests(LiveServerTestCase):
    def post(self, key: str, results: list[Any]) -> None:
        r = requests.post(f"{self.live_server_url}/v1/images/generations", timeout=30,
                          headers={"Authorization": f"Bearer {key}"}, json={"model": "dall-e-2", "prompt": "a"})
        results.append((r.status_code, r.json()))

    def test_requests_in_flight_are_limited_per_token_and_per_channel(self) -> None:
        _token, key = make_token(name="one-at-a-time", max_in_flight=1)
        _other, other_key = make_token(name="free")
        with FakeUpstream() as slow:
            slow.respond(200, OK, delay=0.8)
            make_channel(base_url=slow.url, max_in_flight=1)
            first: list[Any] = []
            running = threading.Thread(target=self.post, args=(key, first))
            running.start()
            time.sleep(0.3)
            same_token: list[Any] = []
            self.post(key, same_token)
            channel_full: list[Any] = []
            self.post(other_key, channel_full)
            running.join()
        self.assertEqual(first[0][0], 200)
        self.assertEqual((same_token[0][0], same_token[0][1]["error"]["code"]), (429, "rate_limit_exceeded"))
        self.assertEqual((channel_full[0][0], channel_full[0][1]["error"]["code"]), (429, "rate_limit_exceeded"))
        self.assertEqual(len(slow.requests), 1)


class FaultTests(ApiTestCase):
    """Each fault gives the client a correct answer, leaves one usage row per request with every attempt, charges only
    what was delivered and holds nothing back."""

    def run_fault(self, fault: dict[str, Any], *, safe_to_retry: bool = False, n: int = 1,
                  faulty: bool = True) -> tuple[Any, Any, Any]:
        token, key = make_token(name=f"f{ApiToken.objects.count()}", budget="1")
        Channel.objects.all().delete()
        with FakeUpstream() as bad, FakeUpstream() as good:
            bad.respond(**fault)
            good.respond(200, openai_images(n))
            first = make_channel(base_url=bad.url, priority=1, safe_to_retry=safe_to_retry, timeout=0.5)
            make_channel(base_url=good.url, priority=0)
            r = self.generate({"model": "dall-e-2", "prompt": "a", "n": n, "response_format": "b64_json"}, key=key)
        log = UsageLog.objects.get(request_id=r["x-request-id"])
        self.assertEqual(log.reserved_micros, 0)
        token.refresh_from_db()
        self.assertEqual(token.spent_micros, log.cost_micros)
        first.refresh_from_db()
        self.assertEqual(bool(first.last_error), faulty)
        return r, log, good

    def test_a_500_fails_over(self) -> None:
        r, log, _ = self.run_fault({"status": 500, "body": BROKEN})
        self.assertEqual(r.status_code, 200)
        self.assertEqual([a["outcome"] for a in log.attempts], ["error", "ok"])
        self.assertEqual(log.cost_micros, 20000)

    def test_a_429_with_retry_after_fails_over(self) -> None:
        r, log, _ = self.run_fault({"status": 429, "body": {"error": {"message": "later"}},
                                    "headers": {"Retry-After": "30"}})
        self.assertEqual(r.status_code, 200)
        self.assertEqual(log.attempts[0]["code"], "rate_limit_exceeded")

    def test_garbage_and_an_empty_data_list_fail_over(self) -> None:
        for body in (os.urandom(64), {"created": 1, "data": []}):
            r, log, _ = self.run_fault({"status": 200, "body": body})
            self.assertEqual(r.status_code, 200)
            self.assertEqual([a["outcome"] for a in log.attempts], ["error", "ok"])

    def test_a_hang_past_the_timeout_is_not_retried_unless_the_channel_is_safe_to_retry(self) -> None:
        r, log, good = self.run_fault({"status": 200, "body": OK, "delay": 2})
        assert_openai_error(r, 504, "server_error", "upstream_timeout")
        self.assertEqual((good.requests, log.cost_micros, log.status), ([], 0, "error"))
        self.assertEqual(r["x-should-retry"], "false")  # the provider may have made the image: no blind retry
        r, log, good = self.run_fault({"status": 200, "body": OK, "delay": 2}, safe_to_retry=True)
        self.assertEqual(r.status_code, 200)
        self.assertEqual(len(good.requests), 1)

    def test_a_reset_or_cut_off_answer_is_not_retried_unless_safe(self) -> None:
        for fault in ("reset", "cut"):
            with self.subTest(fault=fault):
                r, log, good = self.run_fault({"status": 200, "body": OK, "fault": fault})
                assert_openai_error(r, 502, "server_error", "upstream_error")
                self.assertEqual(good.requests, [])
                self.assertEqual(r["x-should-retry"], "false")
                r, log, good = self.run_fault({"status": 200, "body": OK, "fault": fault}, safe_to_retry=True)
                self.assertEqual(r.status_code, 200)

    def test_fewer_images_than_asked_are_refunded_in_part(self) -> None:
        r, log, _ = self.run_fault({"status": 200, "body": openai_images(1)}, n=3, faulty=False)
        self.assertEqual(len(r.json()["data"]), 1)
        self.assertEqual((log.n, log.images_returned, log.cost_micros), (3, 1, 20000))

    @override_settings(OPENOPEN8_REQUEST_DEADLINE=0.6)
    def test_the_request_deadline_bounds_every_attempt(self) -> None:
        with FakeUpstream() as slow:
            slow.respond(200, OK, delay=3)
            make_channel(base_url=slow.url, timeout=30)
            started = time.monotonic()
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
        self.assertLess(time.monotonic() - started, 2.5)
        assert_openai_error(r, 504, "server_error", "upstream_timeout")


class ShouldRetryTests(LiveServerTestCase):
    def test_the_sdk_repeats_a_failure_that_made_nothing_but_not_one_that_may_have_made_an_image(self) -> None:
        _, key = make_token()
        sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=key, max_retries=2)
        with FakeUpstream() as up:
            up.respond(500, BROKEN)
            make_channel(base_url=up.url, timeout=0.5)
            with self.assertRaises(openai.InternalServerError):
                sdk.images.generate(model="dall-e-2", prompt="a")
            self.assertEqual(len(up.requests), 3)  # a plain 502: the SDK tried twice more
            up.requests.clear()
            up.respond(200, OK, delay=2)
            with self.assertRaises(openai.APIStatusError) as raised:
                sdk.images.generate(model="dall-e-2", prompt="a")
        self.assertEqual(raised.exception.status_code, 504)
        self.assertEqual(len(up.requests), 1)


class SharedLimitTests(LiveServerTestCase):
    """Two gateway processes on their own ports, sharing this test database (and Redis when configured)."""

    def test_a_tokens_limit_holds_across_two_gateway_processes(self) -> None:
        restore_default_prices()
        _token, key = make_token(name="shared", requests_per_minute=3)
        make_channel(kind="placeholder")
        nodes = [start_gateway(self.addCleanup), start_gateway(self.addCleanup)]
        clear_of_minute_boundary()
        statuses = [requests.post(f"{nodes[i % 2]}/v1/images/generations", timeout=30,
                                  headers={"Authorization": f"Bearer {key}"},
                                  json={"model": "dall-e-2", "prompt": "a", "size": "256x256"}).status_code
                    for i in range(6)]
        self.assertEqual(sorted(statuses), [200, 200, 200, 429, 429, 429])
