# The SDK types every event field as optional; these tests check the values themselves.
# mypy: disable-error-code="union-attr,index,arg-type"
"""Streamed answers (gateway/streaming.py) as the official openai SDK reads them, from providers that stream and
from providers that do not."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import threading
import time
from typing import Any

import openai
import requests
from django.test import LiveServerTestCase, TransactionTestCase, override_settings
from PIL import Image

from gateway.models import ApiToken, UsageLog
from tests.base import eventually
from tests.factories import make_channel, make_token, make_token_price, openai_images, png_b64, png_bytes
from tests.fake_upstream import EventStream, FakeUpstream, Recorded
from tests.processes import ROOT, start_gateway

USAGE = {"input_tokens": 20, "input_tokens_details": {"text_tokens": 20, "image_tokens": 0}, "output_tokens": 1056,
         "total_tokens": 1076}


def partial(index: int, b64: str | None = None) -> dict[str, Any]:
    return {"type": "image_generation.partial_image", "b64_json": b64 or png_b64(4 + index, 4),
            "partial_image_index": index, "created_at": 1700000000, "size": "1024x1024", "quality": "medium",
            "background": "opaque", "output_format": "png"}


def completed(b64: str | None = None, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "image_generation.completed", "b64_json": b64 or png_b64(9, 9), "created_at": 1700000001,
            "size": "1024x1024", "quality": "medium", "background": "opaque", "output_format": "png",
            "usage": usage or USAGE}


class StreamTests(LiveServerTestCase):
    def setUp(self) -> None:
        make_token_price(model="gpt-image-1.5", text_input="5", image_input="8", image_output="32")
        self.token, self.key = make_token(budget="5")
        self.sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=self.key, max_retries=0)

    def stream(self, **fields: Any) -> list[tuple[float, Any]]:
        """The events the SDK yields, each with when it arrived."""
        fields = {"model": "gpt-image-1.5", "prompt": "a lighthouse", "stream": True, **fields}
        return [(time.monotonic(), event) for event in self.sdk.images.generate(**fields)]

    def spent(self) -> int:
        return ApiToken.objects.get(pk=self.token.pk).spent_micros

    def test_a_providers_events_reach_the_client_as_they_are_sent_and_the_usage_is_charged(self) -> None:
        provider = EventStream([(0.0, partial(0)), (0.4, partial(1)), (0.4, completed())])
        with FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.stream(partial_images=2)
        self.assertEqual([e.type for _, e in events], ["image_generation.partial_image"] * 2
                         + ["image_generation.completed"])
        self.assertEqual([e.partial_image_index for _, e in events[:2]], [0, 1])
        # Relayed, not buffered: the first partial reached the client before the provider sent its image.
        self.assertLess(events[0][0], provider.sent_at[2])
        self.assertEqual(base64.b64decode(events[2][1].b64_json), png_bytes(9, 9))
        self.assertEqual(events[2][1].usage.output_tokens, 1056)
        sent = up.requests[0].json()
        self.assertEqual((sent["stream"], sent["partial_images"]), (True, 2))
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.images_returned, log.cost_micros), ("success", 1, 20 * 5 + 1056 * 32))
        self.assertEqual(self.spent(), 20 * 5 + 1056 * 32)
        metrics = requests.get(f"{self.live_server_url}/metrics", timeout=10).text
        self.assertIn('openopen8_stream_first_event_seconds_count{endpoint="generations"}', metrics)

    def test_a_chunked_stream_is_relayed_as_it_comes_too(self) -> None:
        provider = EventStream([(0.0, partial(0)), (0.5, completed())], chunked=True)
        with FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.stream(partial_images=1)
        self.assertEqual(len(events), 2)
        self.assertLess(events[0][0], provider.sent_at[1])

    def test_a_multi_megabyte_event_is_relayed_intact(self) -> None:
        big = base64.b64encode(bytes(range(256)) * 12_000).decode()  # about 4 MB of base64
        with FakeUpstream() as up:
            up.respond(200, EventStream([(0.0, completed(big))]))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.stream()
        self.assertEqual(events[0][1].b64_json, big)

    def test_a_provider_that_does_not_stream_gives_one_completed_event_per_image(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5")
        events = self.stream(n=2, size="1024x1536", partial_images=3)
        self.assertEqual([e.type for _, e in events], ["image_generation.completed"] * 2)
        image = Image.open(io.BytesIO(base64.b64decode(events[0][1].b64_json)))
        self.assertEqual(image.size, (1024, 1536))
        self.assertEqual((events[0][1].size, events[0][1].output_format), ("1024x1536", "png"))
        self.assertEqual(UsageLog.objects.get().images_returned, 2)

    def test_an_edit_streams_image_edit_events(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5")
        events = list(self.sdk.images.edit(model="gpt-image-1.5", prompt="add a door", stream=True,
                                           image=("house.png", png_bytes(32, 32), "image/png")))
        self.assertEqual([e.type for e in events], ["image_edit.completed"])

    def test_a_channel_that_fails_before_its_first_event_fails_over(self) -> None:
        with FakeUpstream() as broken, FakeUpstream() as good:
            broken.respond(500, {"error": {"message": "overloaded"}})
            good.respond(200, EventStream([(0.0, partial(0)), (0.0, completed())]))
            make_channel(base_url=broken.url, models="gpt-image-1.5", priority=5)
            make_channel(base_url=good.url, models="gpt-image-1.5")
            events = self.stream(partial_images=1)
        self.assertEqual(len(events), 2)
        self.assertEqual([a["outcome"] for a in UsageLog.objects.get().attempts], ["error", "ok"])

    def test_a_stream_that_breaks_after_its_first_event_ends_with_an_error_the_sdk_raises(self) -> None:
        with FakeUpstream() as up, FakeUpstream() as other:
            up.respond(200, EventStream([(0.0, partial(0)), (0.0, partial(1)), (0.0, completed())], cut=1))
            other.respond(200, EventStream([(0.0, completed())]))
            make_channel(base_url=up.url, models="gpt-image-1.5", priority=5)
            make_channel(base_url=other.url, models="gpt-image-1.5")
            seen = []
            with self.assertRaises(openai.APIError) as raised:
                for event in self.sdk.images.generate(model="gpt-image-1.5", prompt="x", stream=True,
                                                      partial_images=2):
                    seen.append(event.type)
        self.assertEqual(seen, ["image_generation.partial_image"])
        self.assertIn("broke off", str(raised.exception))
        self.assertEqual(other.requests, [])  # the client had an event: no other channel starts over
        eventually(lambda: UsageLog.objects.get().status != "pending")
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.cost_micros, log.error_code), ("error", 0, "upstream_error"))
        self.assertEqual(self.spent(), 0)  # the hold went back

    def test_a_failure_before_anything_streamed_is_a_plain_error_with_its_status(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": "Your request was rejected by the safety system.",
                                       "type": "image_generation_user_error", "code": "moderation_blocked"}})
            make_channel(base_url=up.url, models="gpt-image-1.5")
            with self.assertRaises(openai.BadRequestError) as raised:
                self.stream()
        self.assertEqual(raised.exception.status_code, 400)
        self.assertEqual(raised.exception.code, "content_policy_violation")

    @override_settings(OPENOPEN8_STREAM_KEEPALIVE=0.1)
    def test_comments_keep_a_silent_stream_alive_until_the_first_event(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, EventStream([(0.8, completed())]))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = requests.post(f"{self.live_server_url}/v1/images/generations", stream=True, timeout=30,
                              headers={"Authorization": f"Bearer {self.key}"},
                              json={"model": "gpt-image-1.5", "prompt": "x", "stream": True})
            lines = [line for line in r.iter_lines() if line]
        self.assertEqual((r.status_code, r.headers["Content-Type"]), (200, "text/event-stream"))
        self.assertTrue(r.headers["x-request-id"].startswith("req_"))
        self.assertGreaterEqual(lines.count(b": keep-alive"), 3)
        self.assertEqual(lines[-2:][0], b"event: image_generation.completed")

    @override_settings(OPENOPEN8_STREAM_KEEPALIVE=0.1)  # a comment every 0.1 s finds the client gone at once
    def test_a_client_that_hangs_up_stops_the_relay_and_its_row_says_so(self) -> None:
        provider = EventStream([(0.0, partial(0)), (1.5, partial(1)), (1.5, completed())])
        with FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = requests.post(f"{self.live_server_url}/v1/images/generations", stream=True, timeout=30,
                              headers={"Authorization": f"Bearer {self.key}"},
                              json={"model": "gpt-image-1.5", "prompt": "x", "stream": True, "partial_images": 2})
            next(r.iter_lines())
            r.close()
            eventually(lambda: UsageLog.objects.get().status != "pending", within=10)
        log = UsageLog.objects.get()
        self.assertEqual(log.client_gone, UsageLog.ClientGone.BEFORE)
        self.assertLess(len(provider.sent_at), 3)  # the provider's image was never read
        self.assertEqual((log.cost_micros, self.spent()), (0, 0))

    def test_a_stream_asked_for_urls_carries_the_hosted_url_on_its_completed_event(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, EventStream([(0.0, completed())]))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.stream(response_format="url")
        event = events[0][1]
        self.assertTrue(event.b64_json)
        hosted = requests.get(event.model_extra["url"], timeout=10)
        self.assertEqual(hosted.content, png_bytes(9, 9))

    def test_streams_are_refused_where_openai_refuses_them(self) -> None:
        make_channel(kind="placeholder", models="dall-e-3")
        with self.assertRaises(openai.BadRequestError) as raised:
            list(self.sdk.images.generate(model="dall-e-3", prompt="x", stream=True))
        self.assertEqual(raised.exception.param, "stream")

    def test_a_whole_answer_from_a_provider_asked_to_stream_becomes_events(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1, usage=USAGE))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.stream()
        self.assertEqual([e.type for _, e in events], ["image_generation.completed"])
        self.assertEqual(events[0][1].usage.output_tokens, 1056)
        self.assertEqual(UsageLog.objects.get().cost_micros, 20 * 5 + 1056 * 32)


NODE_SDK = ROOT / "tests" / "node"


class NodeStreamTests(LiveServerTestCase):
    """The same streams as the official openai Node SDK reads them (tests/node, installed by `make test`)."""

    def setUp(self) -> None:
        if not shutil.which("node") or not (NODE_SDK / "node_modules" / "openai").is_dir():
            self.skipTest("node or the openai Node SDK is missing (npm ci --prefix tests/node installs it)")
        make_token_price(model="gpt-image-1.5", text_input="5", image_input="8", image_output="32")
        self.token, self.key = make_token(budget="5")

    def node(self, endpoint: str, **fields: Any) -> list[dict[str, Any]]:
        """What the Node SDK yielded, an event a dict, or one {"error": ...} last if it raised."""
        ran = subprocess.run(["node", str(NODE_SDK / "stream_images.mjs"), f"{self.live_server_url}/v1", self.key,
                              endpoint, json.dumps({"model": "gpt-image-1.5", "prompt": "a lighthouse", **fields})],
                             capture_output=True, text=True, timeout=60, check=True)
        return [json.loads(line) for line in ran.stdout.splitlines()]

    def test_the_node_sdk_iterates_partial_and_completed_events(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, EventStream([(0.0, partial(0)), (0.2, partial(1)), (0.2, completed())]))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            events = self.node("generate", partial_images=2)
        self.assertEqual([e["type"] for e in events], ["image_generation.partial_image"] * 2
                         + ["image_generation.completed"])
        self.assertEqual(base64.b64decode(events[2]["b64_json"]), png_bytes(9, 9))
        self.assertEqual(events[2]["usage"]["output_tokens"], 1056)
        self.assertEqual(UsageLog.objects.get().cost_micros, 20 * 5 + 1056 * 32)

    def test_the_node_sdk_streams_an_edit_and_raises_the_error_event_of_a_broken_stream(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5", priority=5)
        events = self.node("edit", image=png_b64(32, 32))
        self.assertEqual([e["type"] for e in events], ["image_edit.completed"])
        with FakeUpstream() as up:
            up.respond(200, EventStream([(0.0, partial(0)), (0.0, completed())], cut=1))
            make_channel(base_url=up.url, models="gpt-image-1.5", priority=9)
            events = self.node("generate", partial_images=1)
        self.assertEqual(events[0]["type"], "image_generation.partial_image")
        self.assertEqual(events[1]["error"]["kind"], "APIError")
        self.assertIn("broke off", events[1]["error"]["message"])


class ProductionStreamTests(TransactionTestCase):
    def test_gunicorns_workers_relay_events_as_they_come_and_hold_many_streams_at_once(self) -> None:
        make_token_price(model="gpt-image-1.5", text_input="5", image_input="8", image_output="32")
        token, key = make_token(budget="5")
        streams = [EventStream([(0.0, partial(0)), (1.0, completed())]) for _ in range(8)]
        served = iter(streams)
        lock = threading.Lock()

        def provider(_request: Recorded) -> EventStream:
            with lock:
                return next(served)

        arrivals: list[tuple[float, float]] = []
        with FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url, models="gpt-image-1.5")
            gateway = start_gateway(self.addCleanup, OPENOPEN8_STREAM_KEEPALIVE="0.2")
            sdk = openai.OpenAI(base_url=f"{gateway}/v1", api_key=key, max_retries=0)

            def one() -> None:
                times = [time.monotonic() for _ in sdk.images.generate(model="gpt-image-1.5", prompt="x",
                                                                        stream=True, partial_images=1)]
                with lock:
                    arrivals.append((times[0], times[-1]))

            threads = [threading.Thread(target=one) for _ in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        self.assertEqual(len(arrivals), 8)
        # One worker held all eight together: every first event came before any provider sent its image.
        self.assertLess(max(first for first, _ in arrivals), min(s.sent_at[1] for s in streams))
        eventually(lambda: UsageLog.objects.filter(status="success").count() == 8, within=10)
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 8 * (20 * 5 + 1056 * 32))
