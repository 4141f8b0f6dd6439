"""The strict JSON body parser (gateway/parsers.py): what Python's json module takes but nothing downstream can is
the client's 400, before any hold, hash or provider call."""

from __future__ import annotations

from typing import Any

from django.test import override_settings

from gateway.models import ApiToken, UsageLog
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel, make_price, make_token
from tests.fake_upstream import FakeUpstream


class StrictJsonTests(ApiTestCase):
    def post_raw(self, body: bytes, key: str | None = None, path: str = "/v1/images/generations") -> Any:
        return self.client.post(path, data=body, content_type="application/json",
                                headers={"Authorization": f"Bearer {key or self.key}"})

    def test_bodies_python_would_take_but_nothing_downstream_can_are_a_400(self) -> None:
        make_price(model="dall-e-2", size="1024x1024", usd="0.02")
        token, key = make_token(name="budgeted", budget="1")
        cases = {
            "deep": b'{"model": "dall-e-2", "prompt": "a", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            "deep but parseable": b'{"model": "dall-e-2", "prompt": "a", "x": ' + b"[" * 100 + b"]" * 100 + b"}",
            "surrogate prompt": b'{"model": "dall-e-2", "prompt": "a \\ud800 b"}',
            "surrogate model": b'{"model": "dall-\\udfffe-2", "prompt": "a"}',
            "surrogate key": b'{"model": "dall-e-2", "prompt": "a", "\\ud83d": 1}',
            "huge number": b'{"model": "dall-e-2", "prompt": "a", "seed": 1e400}',
            "NaN": b'{"model": "dall-e-2", "prompt": "a", "seed": NaN}',
            "not UTF-8": b'{"model": "dall-e-2", "prompt": "\xff\xfe"}',
        }
        with FakeUpstream() as up:
            make_channel(base_url=up.url, models="dall-e-2")
            for name, body in cases.items():
                with self.subTest(name):
                    for path in ("/v1/images/generations", "/v1/images/edits"):
                        r = self.post_raw(body, key, path)
                        error = r.json()["error"]
                        assert_openai_error(r, 400, "invalid_request_error", error["code"], error["param"])
        self.assertEqual(up.requests, [])
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 0)
        self.assertFalse(UsageLog.objects.filter(status="pending").exists())

    def test_the_param_names_the_field_with_the_surrogate(self) -> None:
        r = self.post_raw(b'{"model": "dall-e-2", "prompt": "a \\ud800 b"}')
        self.assertIn("surrogate", assert_openai_error(r, 400, "invalid_request_error", param="prompt")["message"])

    def test_a_broken_multipart_body_is_said_to_be_multipart(self) -> None:
        r = self.client.post("/v1/images/edits", data=b"--nope\r\nContent-Disposition: form-data\r\n\r\nx",
                             content_type="multipart/form-data",  # no boundary
                             headers={"Authorization": f"Bearer {self.key}"})
        self.assertIn("multipart", assert_openai_error(r, 400, "invalid_request_error")["message"])

    @override_settings(OPENOPEN8_DEFAULT_PROMPT_MAX=100)
    def test_a_model_without_a_rule_has_the_default_prompt_cap(self) -> None:
        make_channel(kind="placeholder", models="my-own-model")
        r = self.generate({"model": "my-own-model", "prompt": "a" * 101})
        assert_openai_error(r, 400, "invalid_request_error", "string_above_max_length", "prompt")
        self.assertEqual(self.generate({"model": "my-own-model", "prompt": "a" * 100,
                                        "response_format": "b64_json"}).status_code, 200)
