"""A bounded property-based fuzz of the three POST endpoints: whatever a client sends, the answer is never a 5xx,
and every answer that is not a success is OpenAI's error JSON. Derandomized, so every run tries the same bodies."""

from __future__ import annotations

import json
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.django import TestCase

from tests.factories import make_channel, make_token, openai_images, png_bytes
from tests.fake_upstream import FakeUpstream

FIELDS = ["model", "prompt", "n", "size", "quality", "response_format", "style", "user", "background",
          "output_format", "output_compression", "moderation", "stream", "partial_images", "image", "images", "mask",
          "input_fidelity", "seed", "negative_prompt", "watermark", "image_url", "safety_identifier"]
MODELS = ["dall-e-2", "dall-e-3", "gpt-image-1.5", "gpt-image-2", "seedream", "unknown-model", ""]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40), st.sampled_from(MODELS),
                    st.sampled_from(["1024x1024", "256x256", "auto", "b64_json", "url", "hd", "png",
                                     "data:image/png;base64,AAAA"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=12)
bodies = st.one_of(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=12), values, max_size=8), values)
form_values = st.one_of(st.text(max_size=40), st.sampled_from(MODELS), st.integers().map(str),
                        st.sampled_from(["1024x1024", "256x256", "true", "false", "b64_json", "-1", "11"]))
forms = st.dictionaries(st.sampled_from(FIELDS), form_values, max_size=8)
uploads = st.lists(st.one_of(st.binary(max_size=64), st.just(png_bytes(8, 8)), st.just(png_bytes(16, 16))), max_size=3)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class FuzzTests(TestCase):
    def setUp(self) -> None:
        _token, self.key = make_token(name="fuzz", budget="1000")
        self.upstream = FakeUpstream().__enter__()
        self.addCleanup(self.upstream.__exit__)
        self.upstream.respond(200, openai_images(1))
        make_channel(base_url=self.upstream.url, models="*", priority=1)
        make_channel(kind="placeholder", models="*")

    def check(self, r: Any) -> None:
        assert r.status_code < 500, (r.status_code, r.content[:300])
        if r.status_code >= 400:
            body = json.loads(r.content)
            assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body

    @FUZZ
    @given(body=bodies, endpoint=st.sampled_from(["generations", "edits", "variations"]))
    def test_any_json_body_is_answered_without_a_5xx(self, body: Any, endpoint: str) -> None:
        self.check(self.client.post(f"/v1/images/{endpoint}", data=json.dumps(body), content_type="application/json",
                                    headers={"Authorization": f"Bearer {self.key}"}))

    @FUZZ
    @given(raw=st.binary(max_size=200), endpoint=st.sampled_from(["generations", "edits"]),
           content_type=st.sampled_from(["application/json", "multipart/form-data", "text/plain",
                                         "multipart/form-data; boundary=x", "application/x-www-form-urlencoded"]))
    def test_any_raw_body_is_answered_without_a_5xx(self, raw: bytes, endpoint: str, content_type: str) -> None:
        self.check(self.client.post(f"/v1/images/{endpoint}", data=raw, content_type=content_type,
                                    headers={"Authorization": f"Bearer {self.key}"}))

    @FUZZ
    @given(fields=forms, files=uploads, mask=st.one_of(st.none(), st.binary(max_size=32), st.just(png_bytes(8, 8))),
           endpoint=st.sampled_from(["edits", "variations"]), name=st.sampled_from(["image", "image[]"]))
    def test_any_multipart_body_is_answered_without_a_5xx(self, fields: dict[str, str], files: list[bytes],
                                                         mask: bytes | None, endpoint: str, name: str) -> None:
        data: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("image", "mask")}
        if files:
            data[name] = [SimpleUploadedFile(f"{i}.png", f, content_type="image/png") for i, f in enumerate(files)]
        if mask is not None:
            data["mask"] = SimpleUploadedFile("mask.png", mask, content_type="image/png")
        self.check(self.client.post(f"/v1/images/{endpoint}", data=data,
                                    headers={"Authorization": f"Bearer {self.key}"}))
