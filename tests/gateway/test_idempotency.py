# The SDK types every answer field as optional; these tests check the values themselves.
# mypy: disable-error-code="index"
"""Idempotency-Key on image requests (gateway/idempotency.py), as the official openai SDK and plain HTTP send it."""

from __future__ import annotations

import itertools
from datetime import timedelta
from typing import Any

import openai
from django.test import LiveServerTestCase
from django.utils import timezone

from gateway.idempotency import idempotency_purge
from gateway.models import ApiToken, IdempotentRequest, UsageLog
from tests.base import ConcurrentLiveServerTestCase, post_at_once
from tests.factories import make_channel, make_price, make_token, png_b64, png_bytes
from tests.fake_upstream import EventStream, FakeUpstream, Recorded


def new_image_each_call() -> Any:
    """A provider answer with a different image every call, so a repeated answer is told from a new one."""
    count = itertools.count()

    def answer(_: Recorded) -> dict[str, Any]:
        return {"created": 1700000000, "data": [{"b64_json": png_b64(8 + next(count), 8)}]}

    return answer


class IdempotencyTests(LiveServerTestCase):
    def setUp(self) -> None:
        make_price(model="dall-e-2", usd="0.02")
        self.token, self.key = make_token(budget="5")
        self.sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=self.key, max_retries=0)

    def generate(self, idempotency_key: str, **fields: Any) -> Any:
        fields = {"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json", **fields}
        return self.sdk.images.with_raw_response.generate(**fields, extra_headers={"Idempotency-Key": idempotency_key})

    def spent(self) -> int:
        return ApiToken.objects.get(pk=self.token.pk).spent_micros

    def test_a_repeat_gets_the_first_answer_and_is_charged_once(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url)
            first, again = self.generate("order-17"), self.generate("order-17")
            other = self.generate("order-18")
        self.assertEqual(len(up.requests), 2)  # order-17 once, order-18 once
        self.assertEqual(again.parse().data[0].b64_json, first.parse().data[0].b64_json)
        self.assertNotEqual(other.parse().data[0].b64_json, first.parse().data[0].b64_json)
        self.assertEqual(again.headers["x-request-id"], first.headers["x-request-id"])
        self.assertEqual(self.spent(), 2 * 20000)
        replay = UsageLog.objects.get(replay_of=first.headers["x-request-id"])
        self.assertEqual((replay.status, replay.cost_micros, replay.images_returned), ("success", 0, 0))
        self.assertEqual(UsageLog.objects.count(), 3)  # every request has its row, the repeat too

    def test_the_same_key_on_other_content_is_refused(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url)
            self.generate("order-17")
            with self.assertRaises(openai.UnprocessableEntityError) as raised:
                self.generate("order-17", prompt="a different lighthouse")
        self.assertEqual(raised.exception.code, "idempotency_key_reused")
        self.assertEqual(len(up.requests), 1)

    def test_keys_are_the_api_keys_own(self) -> None:
        _, other_key = make_token(name="bob")
        bob = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=other_key, max_retries=0)
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url)
            mine = self.generate("order-17").parse()
            theirs = bob.images.generate(model="dall-e-2", prompt="a lighthouse", response_format="b64_json",
                                         extra_headers={"Idempotency-Key": "order-17"})
        self.assertEqual(len(up.requests), 2)
        self.assertNotEqual(theirs.data[0].b64_json, mine.data[0].b64_json)

    def test_a_failed_request_gives_its_key_back_so_a_retry_tries_again(self) -> None:
        with FakeUpstream() as up:
            up.queue(500, {"error": {"message": "overloaded"}})
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url)
            with self.assertRaises(openai.APIStatusError):
                self.generate("order-17")
            self.assertEqual(self.generate("order-17").status_code, 200)
        self.assertEqual(len(up.requests), 2)
        self.assertEqual(self.spent(), 20000)

    def test_an_edit_repeated_by_a_new_multipart_body_is_the_same_request(self) -> None:
        make_price(model="gpt-image-1.5", usd="0.04")
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url, models="gpt-image-1.5")
            answers = [self.sdk.images.edit(model="gpt-image-1.5", prompt="add a door",
                                            image=("house.png", png_bytes(32, 32), "image/png"),
                                            extra_headers={"Idempotency-Key": "edit-1"}) for _ in range(2)]
            with self.assertRaises(openai.UnprocessableEntityError):  # other image bytes: other content
                self.sdk.images.edit(model="gpt-image-1.5", prompt="add a door",
                                     image=("house.png", png_bytes(33, 32), "image/png"),
                                     extra_headers={"Idempotency-Key": "edit-1"})
        self.assertEqual(len(up.requests), 1)
        self.assertEqual(answers[0].data[0].b64_json, answers[1].data[0].b64_json)

    def test_a_stream_repeated_gets_its_images_again_as_completed_events(self) -> None:
        make_price(model="gpt-image-1.5", usd="0.04")
        partial = {"type": "image_generation.partial_image", "b64_json": png_b64(4, 4), "partial_image_index": 0}
        completed = {"type": "image_generation.completed", "b64_json": png_b64(9, 9),
                     "usage": {"input_tokens": 5, "output_tokens": 50, "total_tokens": 55}}
        events: list[tuple[float, dict[str, Any]]] = [(0.0, partial), (0.0, completed)]
        with FakeUpstream() as up:
            up.respond(200, EventStream(events))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            first, again = ([e.type for e in self.sdk.images.generate(
                model="gpt-image-1.5", prompt="a lighthouse", stream=True, partial_images=1,
                extra_headers={"Idempotency-Key": "stream-1"})] for _ in range(2))
            repeated = list(self.sdk.images.generate(model="gpt-image-1.5", prompt="a lighthouse", stream=True,
                                                     partial_images=1, extra_headers={"Idempotency-Key": "stream-1"}))
        self.assertEqual(first, ["image_generation.partial_image", "image_generation.completed"])
        self.assertEqual(again, ["image_generation.completed"])  # the images, not the provider's progress
        self.assertEqual(repeated[0].b64_json, png_b64(9, 9))
        self.assertEqual(len(up.requests), 1)
        self.assertEqual(self.spent(), 40000)

    def test_a_malformed_key_is_a_clear_400(self) -> None:
        make_channel(kind="placeholder")
        with self.assertRaises(openai.BadRequestError) as raised:
            self.generate("has spaces in it")
        self.assertEqual(raised.exception.code, "invalid_idempotency_key")

    def test_an_answer_is_kept_for_a_day_only(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call())
            make_channel(base_url=up.url)
            first = self.generate("order-17").parse()
            IdempotentRequest.objects.update(answered_at=timezone.now() - timedelta(hours=24, seconds=1))
            later = self.generate("order-17").parse()
        self.assertEqual(len(up.requests), 2)
        self.assertNotEqual(later.data[0].b64_json, first.data[0].b64_json)
        self.assertEqual(idempotency_purge(), 0)  # the new answer is kept
        IdempotentRequest.objects.update(answered_at=timezone.now() - timedelta(days=2))
        self.assertEqual(idempotency_purge(), 1)


class ConcurrentIdempotencyTests(ConcurrentLiveServerTestCase):
    def test_repeats_sent_at_once_wait_for_the_first_and_charge_once(self) -> None:
        make_price(model="dall-e-2", usd="0.02")
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, new_image_each_call(), delay=1.0)
            make_channel(base_url=up.url)
            answers = post_at_once(f"{self.live_server_url}/v1/images/generations",
                                   {"model": "dall-e-2", "prompt": "a lighthouse", "response_format": "b64_json"},
                                   [key] * 8, headers={"Idempotency-Key": "order-17"})
        self.assertEqual([a.status_code for a in answers], [200] * 8)
        self.assertEqual(len(up.requests), 1)
        self.assertEqual(len({a.json()["data"][0]["b64_json"] for a in answers}), 1)
        self.assertEqual(len({a.headers["x-request-id"] for a in answers}), 1)
        token.refresh_from_db()
        self.assertEqual(token.spent_micros, 20000)
        self.assertEqual(UsageLog.objects.exclude(replay_of="").count(), 7)
