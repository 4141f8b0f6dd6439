from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from django.db import connection
from django.test import TransactionTestCase, override_settings

from channels.models import Channel
from gateway.models import ApiToken, UsageLog
from tests.base import ApiTestCase, assert_openai_error, post_json
from tests.factories import make_channel, make_price, make_token, openai_images, png_bytes, restore_default_prices
from tests.fake_upstream import FakeUpstream, Recorded

PROVIDER_KEY = "sk-provider-SECRET-abcdef123456"


class ImagesApiTests(ApiTestCase):
    def fetch_hosted(self, url: str) -> Any:
        self.assertTrue(url.startswith("http://testserver/v1/images/files/"), url)
        return self.client.get(url.removeprefix("http://testserver"))

    def test_it_sends_the_channels_key_and_the_clients_fields_upstream(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url + "/v1", api_key=PROVIDER_KEY)
            r = self.generate({"model": "dall-e-3", "prompt": "a cat", "quality": "hd", "style": "natural",
                               "user": "u-1", "response_format": "b64_json", "watermark": False})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual((sent.method, sent.path), ("POST", "/v1/images/generations"))
        self.assertEqual(sent.headers["Authorization"], f"Bearer {PROVIDER_KEY}")
        self.assertNotIn(self.key, json.dumps(sent.headers))
        self.assertEqual(sent.json(), {"model": "dall-e-3", "prompt": "a cat", "n": 1, "quality": "hd",
                                       "style": "natural", "user": "u-1", "response_format": "b64_json",
                                       "watermark": False})
        self.assertEqual(r["x-request-id"], UsageLog.objects.get().request_id)

    def test_a_channel_set_to_send_the_tokens_id_sends_a_stable_hash_instead_of_the_clients_user(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, end_user="token")
            for _ in range(2):
                self.generate({"model": "dall-e-2", "prompt": "a", "user": "alice@example.com"})
        sent = [r.json()["user"] for r in up.requests]
        self.assertEqual(sent[0], sent[1])
        self.assertTrue(sent[0].startswith("oo8-") and "alice" not in sent[0] and self.key not in sent[0])

    def test_it_maps_the_model_name_for_the_provider(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="dall-e-3", model_map={"dall-e-3": "my-dalle3-deployment"})
            r = self.generate({"model": "dall-e-3", "prompt": "a cat", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200)
        self.assertEqual(up.requests[0].json()["model"], "my-dalle3-deployment")
        log = UsageLog.objects.get()
        self.assertEqual((log.model, log.provider_model), ("dall-e-3", "my-dalle3-deployment"))

    def test_it_hosts_a_base64_answer_when_the_client_wants_a_url(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(2, usage={"total_tokens": 5}, size="1024x1024"))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat", "n": 2, "response_format": "url"})
        body = r.json()
        self.assertEqual(len(body["data"]), 2)
        self.assertEqual(body["usage"], {"total_tokens": 5})
        self.assertEqual(body["size"], "1024x1024")
        self.assertIsInstance(body["created"], int)
        image = self.fetch_hosted(body["data"][0]["url"])
        self.assertEqual(image.status_code, 200)
        self.assertEqual(image["Content-Type"], "image/png")
        self.assertEqual(b"".join(image.streaming_content), png_bytes())
        self.assertNotEqual(body["data"][0]["url"], body["data"][1]["url"])

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_it_rehosts_a_provider_url_so_the_client_never_sees_the_provider(self) -> None:
        with FakeUpstream() as up:
            jpeg = b"\xff\xd8\xff\xe0" + b"jpeg-bytes" * 10
            up.serve_file("/img/0.png", jpeg, "image/jpeg")
            up.respond(200, openai_images(1, style="url", url_base=up.url))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-3", "prompt": "a cat"})
        body = r.json()
        self.assertNotIn(up.url, json.dumps(body))
        self.assertTrue(body["data"][0]["url"].endswith(".jpg"))
        image = self.fetch_hosted(body["data"][0]["url"])
        self.assertEqual(image["Content-Type"], "image/jpeg")
        self.assertEqual(b"".join(image.streaming_content), jpeg)

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_it_encodes_a_provider_url_when_the_client_wants_base64(self) -> None:
        with FakeUpstream() as up:
            url = up.serve_file("/img/0.png", png_bytes(3, 3))
            up.respond(200, {"created": 1, "data": [{"url": url, "revised_prompt": "a fluffy cat"}]})
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-3", "prompt": "a cat", "response_format": "b64_json"})
        item = r.json()["data"][0]
        self.assertEqual(base64.b64decode(item["b64_json"]), png_bytes(3, 3))
        self.assertEqual(item["revised_prompt"], "a fluffy cat")
        self.assertNotIn("url", item)

    @override_settings(OPENOPEN8_MAX_IMAGE_BYTES=1000, OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_a_provider_image_over_the_size_cap_is_not_downloaded_whole(self) -> None:
        with FakeUpstream() as up:
            url = up.serve_file("/img/big.png", png_bytes() + b"\0" * 5000)
            up.respond(200, {"created": 1, "data": [{"url": url}]})
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat", "response_format": "b64_json"})
        error = assert_openai_error(r, 502, "server_error", "upstream_error")
        self.assertIn("1000-byte cap", error["message"])

    def test_a_provider_url_on_another_private_address_is_not_fetched_unless_allowed(self) -> None:
        with FakeUpstream() as up, FakeUpstream() as elsewhere:
            url = elsewhere.serve_file("/img/0.png", png_bytes())
            up.respond(200, {"created": 1, "data": [{"url": url}]})
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat"})
            error = assert_openai_error(r, 502, "server_error", "upstream_error")
            self.assertIn("private or local address", error["message"])
            self.assertEqual(elsewhere.requests, [])  # the image URL was never requested
            with override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True):
                self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a cat"}).status_code, 200)

    def test_a_url_on_the_channels_own_host_is_fetched_as_the_operator_configured_it(self) -> None:
        with FakeUpstream() as up:
            url = up.serve_file("/img/0.png", png_bytes())
            up.respond(200, {"created": 1, "data": [{"url": url}]})
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat", "response_format": "b64_json"})
        self.assertEqual(base64.b64decode(r.json()["data"][0]["b64_json"]), png_bytes())

    def test_it_passes_base64_through_when_both_sides_speak_it(self) -> None:
        with FakeUpstream() as up:
            answer = openai_images(1)
            up.respond(200, answer)
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = self.generate({"model": "gpt-image-1.5", "prompt": "a cat", "background": "opaque"})
        self.assertEqual(r.json()["data"], answer["data"])
        self.assertNotIn("response_format", up.requests[0].json())

    def test_a_gpt_image_model_can_still_get_a_hosted_url(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-2")
            r = self.generate({"model": "gpt-image-2", "prompt": "a cat", "response_format": "url"})
        self.assertIn("url", r.json()["data"][0])
        self.assertNotIn("response_format", up.requests[0].json())

    def test_hosted_urls_expire(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url)
            with override_settings(OPENOPEN8_IMAGE_TTL=1):
                url = self.generate({"model": "dall-e-2", "prompt": "a cat"}).json()["data"][0]["url"]
        import time as time_module
        from unittest import mock
        later = time_module.time() + 2
        with mock.patch("gateway.hosting.time.time", return_value=later):
            r = self.fetch_hosted(url)
        assert_openai_error(r, 404, "invalid_request_error")

    def test_an_unknown_hosted_name_is_a_json_404(self) -> None:
        assert_openai_error(self.client.get("/v1/images/files/ffffffff-" + "a" * 32 + ".png"), 404,
                            "invalid_request_error")
        assert_openai_error(self.client.get("/v1/images/files/..%2Fsecret_key"), 404, "invalid_request_error")

    def test_it_uses_the_public_url_setting_for_hosted_images(self) -> None:
        with FakeUpstream() as up, override_settings(OPENOPEN8_PUBLIC_URL="https://img.example.com"):
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url)
            url = self.generate({"model": "dall-e-2", "prompt": "a cat"}).json()["data"][0]["url"]
        self.assertTrue(url.startswith("https://img.example.com/v1/images/files/"), url)

    def test_it_fails_over_when_the_first_channel_returns_500(self) -> None:
        with FakeUpstream() as bad, FakeUpstream() as good:
            bad.respond(500, {"error": {"message": "boom"}})
            good.respond(200, openai_images(1))
            first = make_channel(base_url=bad.url, priority=10, api_key="sk-key-one-1111")
            second = make_channel(base_url=good.url, priority=5, api_key="sk-key-two-2222")
            r = self.generate({"model": "dall-e-2", "prompt": "a cat", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200)
        self.assertEqual(len(bad.requests), 1)
        self.assertEqual(good.requests[0].headers["Authorization"], "Bearer sk-key-two-2222")
        log = UsageLog.objects.get()
        self.assertEqual([a["channel"] for a in log.attempts], [first.pk, second.pk])
        self.assertEqual([a["outcome"] for a in log.attempts], ["error", "ok"])
        self.assertEqual(log.channel_id, second.pk)
        self.assertIn("500", Channel.objects.get(pk=first.pk).last_error)
        self.assertEqual(Channel.objects.get(pk=second.pk).last_error, "")

    def test_it_fails_over_on_429_and_on_a_refused_connection(self) -> None:
        with FakeUpstream() as limited, FakeUpstream() as good:
            limited.respond(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "3"})
            good.respond(200, openai_images(1))
            make_channel(base_url="http://127.0.0.1:9", priority=20)
            make_channel(base_url=limited.url, priority=10)
            make_channel(base_url=good.url, priority=0)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat"})
        self.assertEqual(r.status_code, 200)
        self.assertEqual([a["outcome"] for a in UsageLog.objects.get().attempts], ["error", "error", "ok"])

    def test_it_stops_after_max_attempts(self) -> None:
        with FakeUpstream() as bad, override_settings(OPENOPEN8_MAX_ATTEMPTS=2):
            bad.respond(503, {"error": {"message": "overloaded"}})
            for priority in (3, 2, 1):
                make_channel(base_url=bad.url, priority=priority)
            r = self.generate({"model": "dall-e-2", "prompt": "a cat"})
        assert_openai_error(r, 502, "server_error", "upstream_error")
        self.assertEqual(len(bad.requests), 2)

    def test_a_refusal_is_not_failed_over_and_costs_nothing(self) -> None:
        _token, key = make_token(name="budgeted", budget="1.00")
        with FakeUpstream() as strict, FakeUpstream() as other:
            strict.respond(400, {"error": {"message": "Your request was rejected as a result of our safety system.",
                                           "type": "invalid_request_error", "param": None,
                                           "code": "content_policy_violation"}})
            other.respond(200, openai_images(1))
            make_channel(base_url=strict.url, priority=10)
            make_channel(base_url=other.url, priority=0)
            r = self.generate({"model": "dall-e-3", "prompt": "something forbidden"}, key=key)
        error = assert_openai_error(r, 400, "invalid_request_error", "content_policy_violation")
        self.assertIn("safety system", error["message"])
        self.assertEqual(other.requests, [])
        self.assertEqual(ApiToken.objects.get(pk=_token.pk).spent_micros, 0)
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.http_status, log.error_code, log.cost_micros),
                         ("error", 400, "content_policy_violation", 0))

    def test_a_gpt_image_moderation_block_is_a_content_policy_violation(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": "Request blocked by moderation.",
                                       "type": "image_generation_user_error", "param": None,
                                       "code": "moderation_blocked"}})
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = self.generate({"model": "gpt-image-1.5", "prompt": "x"})
        assert_openai_error(r, 400, "invalid_request_error", "content_policy_violation")

    def test_a_provider_400_about_the_request_comes_back_without_failover(self) -> None:
        with FakeUpstream() as up, FakeUpstream() as other:
            up.respond(400, {"error": {"message": "Invalid value for seed.", "type": "invalid_request_error",
                                       "param": "seed", "code": "invalid_value"}})
            make_channel(base_url=up.url, priority=1, models="*")
            make_channel(base_url=other.url, priority=0, models="*")
            r = self.generate({"model": "flux", "prompt": "x", "seed": "abc"})
        assert_openai_error(r, 400, "invalid_request_error", "invalid_value", "seed")
        self.assertEqual(other.requests, [])

    def test_an_unserved_model_is_model_not_found(self) -> None:
        make_channel(base_url="http://127.0.0.1:9", models="dall-e-2")
        error = assert_openai_error(self.generate({"model": "dall-e-3", "prompt": "a"}), 404,
                                    "invalid_request_error", "model_not_found", "model")
        self.assertIn("dall-e-3", error["message"])

    def test_a_disabled_channel_is_not_used(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="dall-e-2", enabled=False)
            assert_openai_error(self.generate({"model": "dall-e-2", "prompt": "a"}), 503, "server_error",
                                "model_unavailable")
        self.assertEqual(up.requests, [])

    def test_when_every_channel_fails_the_error_names_no_key_or_address(self) -> None:
        with FakeUpstream() as up:
            up.respond(401, {"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}. See "
                                                  f"{up.url}/account for details."}})
            make_channel(base_url=up.url, api_key=PROVIDER_KEY)
            make_channel(base_url="http://127.0.0.1:9", api_key="sk-other-key-99999999")
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
        error = assert_openai_error(r, 502, "server_error", "upstream_error")
        text = r.content.decode()
        for secret in (PROVIDER_KEY, "sk-other-key-99999999", "127.0.0.1", up.url):
            self.assertNotIn(secret, text)
        self.assertIn("dall-e-2", error["message"])

    def test_a_provider_error_message_is_masked_of_keys(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": f"Bad prompt for key {PROVIDER_KEY} at {up.url}/v1",
                                       "type": "invalid_request_error", "param": "prompt", "code": None}})
            make_channel(base_url=up.url, api_key=PROVIDER_KEY)
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
        self.assertEqual(r.status_code, 400)
        self.assertNotIn(PROVIDER_KEY, r.content.decode())
        self.assertNotIn(up.url.removeprefix("http://"), r.content.decode())

    @override_settings(OPENOPEN8_UPSTREAM_TIMEOUT=0.3)
    def test_a_provider_that_hangs_past_the_timeout_gives_504(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1), delay=1.5)
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
        error = assert_openai_error(r, 504, "server_error", "upstream_timeout")
        self.assertIn("0.3", error["message"])

    def test_malformed_provider_answers_fail_over(self) -> None:
        bad_bodies: list[Any] = ["<html>oops</html>", {"data": "nope"}, {"data": []},
                                 {"data": [{"b64_json": "!!notb64"}]}]
        for bad_body in bad_bodies:
            with self.subTest(bad_body=bad_body), FakeUpstream() as bad, FakeUpstream() as good:
                Channel.objects.all().delete()
                bad.respond(200, bad_body)
                good.respond(200, openai_images(1))
                make_channel(base_url=bad.url, priority=1)
                make_channel(base_url=good.url, priority=0)
                r = self.generate({"model": "dall-e-2", "prompt": "a", "response_format": "url"})
                self.assertEqual(r.status_code, 200, r.content)
                self.assertEqual(len(good.requests), 1)

    def test_every_request_leaves_one_complete_usage_row(self) -> None:
        make_price(model="dall-e-2", size="512x512", usd="0.018")
        with FakeUpstream() as up:
            up.respond(200, openai_images(3))
            channel = make_channel(base_url=up.url)
            self.generate({"model": "dall-e-2", "prompt": "a red fox", "n": 3, "size": "512x512"})
        log = UsageLog.objects.get()
        self.assertEqual(log.status, "success")
        self.assertEqual((log.token_id, log.endpoint, log.model, log.channel_id), (self.token.pk, "generations",
                                                                                   "dall-e-2", channel.pk))
        self.assertEqual((log.n, log.images_returned, log.size, log.quality, log.response_format),
                         (3, 3, "512x512", "standard", "url"))
        self.assertEqual((log.http_status, log.cost_micros, log.reserved_micros), (200, 54000, 0))
        self.assertEqual((log.prompt_length, log.prompt), (9, ""))
        self.assertEqual(len(log.prompt_sha256), 64)
        self.assertNotEqual(log.prompt_sha256, hashlib.sha256(b"a red fox").hexdigest())  # keyed: not guessable
        self.assertIsNotNone(log.latency_ms)
        self.assertIsNotNone(log.provider_latency_ms)
        self.assertIsNotNone(log.completed_at)

    @override_settings(OPENOPEN8_LOG_PROMPTS=True)
    def test_prompts_are_logged_only_when_the_operator_turns_it_on(self) -> None:
        make_channel(kind="placeholder")
        self.generate({"model": "dall-e-2", "prompt": "a red fox", "size": "256x256"})
        self.assertEqual(UsageLog.objects.get().prompt, "a red fox")

    def test_a_failed_check_reaches_no_provider_costs_nothing_and_is_logged(self) -> None:
        _token, key = make_token(name="budgeted", budget="1.00")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a", "size": "1792x1024"}, key=key)
        assert_openai_error(r, 400, "invalid_request_error", "invalid_value", "size")
        self.assertEqual(up.requests, [])
        self.assertEqual(ApiToken.objects.get(pk=_token.pk).spent_micros, 0)
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.http_status, log.error_code), ("error", 400, "invalid_value"))

    def test_a_body_that_is_not_a_json_object_is_refused(self) -> None:
        assert_openai_error(self.generate(["a list"]), 400, "invalid_request_error")
        r = self.client.post("/v1/images/generations", data="{nope", content_type="application/json",
                             HTTP_AUTHORIZATION=f"Bearer {self.key}")
        assert_openai_error(r, 400, "invalid_request_error")

    def test_an_error_answer_carries_the_request_id_of_its_usage_row(self) -> None:
        make_channel(kind="placeholder")
        r = self.generate({"model": "dall-e-2", "prompt": "a", "size": "7x7"})
        self.assertEqual(r.status_code, 400)
        self.assertEqual(r["x-request-id"], UsageLog.objects.get().request_id)

    def test_the_model_list_shows_what_this_key_can_use(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2,dall-e-3,*", model_map={"flux": "flux-dev"})
        make_channel(kind="placeholder", models="sdxl", enabled=False)
        r = self.client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {self.key}")
        self.assertEqual([m["id"] for m in r.json()["data"]], ["dall-e-2", "dall-e-3", "flux"])
        _limited, key = make_token(name="limited", allowed_models="dall-e-3")
        r = self.client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}")
        self.assertEqual([m["id"] for m in r.json()["data"]], ["dall-e-3"])
        assert_openai_error(self.client.get("/v1/models"), 401, "invalid_request_error", "invalid_api_key")

    def test_wrong_method_and_unknown_paths_are_json(self) -> None:
        r = self.client.get("/v1/images/generations", HTTP_AUTHORIZATION=f"Bearer {self.key}")
        self.assertEqual(r.status_code, 405)
        self.assertIn("error", r.json())
        r = self.client.post("/v1/images/files/ffffffff-" + "a" * 32 + ".png")
        self.assertEqual(r.status_code, 405)
        self.assertEqual(r.json()["error"]["code"], "method_not_allowed")
        assert_openai_error(self.client.post("/v1/images/nothing"), 404, "invalid_request_error")


class DemoChannelTests(ApiTestCase):
    body = {"model": "dall-e-3", "prompt": "a lighthouse"}

    def setUp(self) -> None:
        super().setUp()
        make_channel(kind="placeholder", name="Placeholder (demo)", demo=True)

    def test_the_demo_channel_serves_only_keys_that_pay_nothing(self) -> None:
        _, free = make_token(name="free")
        self.assertEqual(post_json(self.client, "/v1/images/generations", self.body, free).status_code, 200)
        _, paying = make_token(name="paying", budget="5")
        r = post_json(self.client, "/v1/images/generations", self.body, paying)
        assert_openai_error(r, 404, "invalid_request_error", "model_not_found", param="model")
        self.assertIn("only by the demo channel", r.json()["error"]["message"])

    def test_a_paying_key_is_served_by_a_real_channel_beside_the_demo(self) -> None:
        _, paying = make_token(name="paying", budget="5")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="dall-e-3")
            for _ in range(4):
                self.assertEqual(post_json(self.client, "/v1/images/generations", self.body, paying).status_code, 200)
        self.assertEqual(len(up.requests), 4)  # the real channel every time, never the demo


class DisabledChannelTests(ApiTestCase):
    def test_a_model_whose_channels_are_all_disabled_is_unavailable_not_unknown(self) -> None:
        make_channel(kind="placeholder", models="dall-e-3", enabled=False)
        r = self.generate({"model": "dall-e-3", "prompt": "a"})
        assert_openai_error(r, 503, "server_error", "model_unavailable")
        self.assertEqual(r["Retry-After"], "60")
        self.assertEqual(UsageLog.objects.get().error_code, "model_unavailable")
        r = self.generate({"model": "no-such-model", "prompt": "a"})
        assert_openai_error(r, 404, "invalid_request_error", "model_not_found", param="model")


class PendingRowTests(TransactionTestCase):
    def test_the_usage_row_and_the_budget_hold_exist_before_the_provider_is_called(self) -> None:
        restore_default_prices()
        token, key = make_token(budget="1")
        seen: list[tuple[str, int, int]] = []

        def provider(request: Recorded) -> dict[str, Any]:
            # Runs in the fake provider's thread, on its own database connection: it sees only committed rows.
            try:
                log = UsageLog.objects.get()
                seen.append((log.status, log.reserved_micros, ApiToken.objects.get(pk=token.pk).spent_micros))
            finally:
                connection.close()
            return openai_images(2)

        with FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url)
            r = post_json(self.client, "/v1/images/generations", {"model": "dall-e-2", "prompt": "a", "n": 2}, key)
        self.assertEqual(r.status_code, 200)
        self.assertEqual(seen, [("pending", 40000, 40000)])
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.reserved_micros, log.cost_micros), ("success", 0, 40000))
