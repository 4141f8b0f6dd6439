# The SDK types every response field as optional; these tests check the values themselves.
# mypy: disable-error-code="union-attr,index,arg-type"
"""The official openai SDK against the gateway's live server, as client developers use it."""

from __future__ import annotations

import base64
import io

import openai
import requests
from django.test import LiveServerTestCase, override_settings
from PIL import Image

from tests.factories import make_channel, make_token, openai_images, png_bytes, restore_default_prices
from tests.fake_upstream import FakeUpstream


class OpenAISdkTests(LiveServerTestCase):
    def setUp(self) -> None:
        restore_default_prices()
        self.token, self.key = make_token(budget="5")
        self.sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=self.key, max_retries=0)

    def test_it_generates_a_hosted_url_the_sdk_user_can_download(self) -> None:
        make_channel(kind="placeholder")
        result = self.sdk.images.generate(model="dall-e-3", prompt="a lighthouse at dawn", size="1792x1024",
                                             response_format="url")
        self.assertEqual(len(result.data), 1)
        self.assertTrue(result.data[0].url.startswith(f"{self.live_server_url}/v1/images/files/"))
        image = requests.get(result.data[0].url, timeout=10)
        self.assertEqual(image.headers["Content-Type"], "image/png")
        self.assertEqual(Image.open(io.BytesIO(image.content)).size, (1792, 1024))
        self.assertTrue(result._request_id and result._request_id.startswith("req_"))

    def test_the_sdk_lists_the_models_it_can_use(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2,dall-e-3")
        self.assertEqual(sorted(m.id for m in self.sdk.models.list()), ["dall-e-2", "dall-e-3"])

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_it_returns_base64_from_a_provider_that_answers_with_urls(self) -> None:
        with FakeUpstream() as up:
            url = up.serve_file("/out/a.png", png_bytes(5, 7))
            up.respond(200, {"created": 1700000001, "data": [{"url": url, "revised_prompt": "a red cat"}]})
            make_channel(base_url=up.url + "/v1")
            result = self.sdk.images.generate(model="dall-e-3", prompt="a cat", response_format="b64_json")
        self.assertEqual(base64.b64decode(result.data[0].b64_json), png_bytes(5, 7))
        self.assertEqual(result.data[0].revised_prompt, "a red cat")
        self.assertEqual(result.created, 1700000001)

    def test_gpt_image_fields_and_usage_come_through(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(2, usage={"input_tokens": 5, "output_tokens": 10, "total_tokens": 15,
                                                    "input_tokens_details": {"text_tokens": 5, "image_tokens": 0}},
                                          output_format="webp", background="opaque", quality="high"))
            make_channel(base_url=up.url + "/v1", models="gpt-image-1.5")
            result = self.sdk.images.generate(model="gpt-image-1.5", prompt="a cat", n=2, quality="high",
                                                 output_format="webp", background="opaque", moderation="low",
                                                 output_compression=80, extra_body={"custom_knob": 3})
        sent = up.requests[0].json()
        self.assertEqual(sent["output_compression"], 80)
        self.assertEqual(sent["custom_knob"], 3)
        self.assertEqual(result.usage.total_tokens, 15)
        self.assertEqual((result.output_format, result.background, result.quality), ("webp", "opaque", "high"))
        self.assertEqual(len(result.data), 2)

    def test_errors_arrive_as_the_sdks_own_exceptions(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        with self.assertRaises(openai.BadRequestError) as bad:
            self.sdk.images.generate(model="dall-e-2", prompt="a", size="1792x1024")
        self.assertEqual((bad.exception.code, bad.exception.param), ("invalid_value", "size"))
        with self.assertRaises(openai.NotFoundError) as missing:
            self.sdk.images.generate(model="dall-e-3", prompt="a")
        self.assertEqual(missing.exception.code, "model_not_found")
        wrong = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key="sk-" + "z" * 40, max_retries=0)
        with self.assertRaises(openai.AuthenticationError) as denied:
            wrong.images.generate(model="dall-e-2", prompt="a")
        self.assertEqual(denied.exception.code, "invalid_api_key")
        _poor, poor_key = make_token(name="poor", budget="0.01")
        poor = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=poor_key, max_retries=0)
        with self.assertRaises(openai.RateLimitError) as quota:
            poor.images.generate(model="dall-e-2", prompt="a")
        self.assertEqual(quota.exception.code, "insufficient_quota")

    def test_a_refusal_is_a_bad_request_with_content_policy_violation(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": "Your request was rejected as a result of our safety system.",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "content_policy_violation"}})
            make_channel(base_url=up.url)
            with self.assertRaises(openai.BadRequestError) as refused:
                self.sdk.images.generate(model="dall-e-3", prompt="forbidden")
        self.assertEqual(refused.exception.code, "content_policy_violation")
