"""Prometheus metrics (gateway/metrics.py)."""

from __future__ import annotations

from django.test import override_settings
from prometheus_client.parser import text_string_to_metric_families

from gateway.state import shared_state
from tests.base import ApiTestCase
from tests.factories import make_channel, make_token, openai_images
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
