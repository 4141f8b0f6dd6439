from __future__ import annotations

import io
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from channels.adapters import get_adapter
from openopen8.core.errors import ContentPolicyViolation, UpstreamKeyRejected
from openopen8.core.schemas import ImagesResponse
from tests.adapters import KEY, answer, png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, mask_png, png_b64
from tests.fake_upstream import FakeUpstream, Recorded


def stability(request: Recorded) -> Any:
    return {"image": png_b64(4, 4), "finish_reason": "SUCCESS", "seed": 42}


class StabilityAdapterTests(ApiTestCase):
    def test_it_generates_with_multipart_an_aspect_ratio_and_one_call_per_image(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, stability)
            make_channel(kind="stability", base_url=up.url, api_key="sk-stab-123456789", models="sd")
            r = self.generate({"model": "sd", "prompt": "a lake", "n": 3, "size": "1792x1024",
                               "negative_prompt": "fog", "seed": 7, "output_format": "webp",
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 3)
        self.assertEqual(len(up.requests), 3)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/v2beta/stable-image/generate/core")
        self.assertEqual((sent.headers["Authorization"], sent.headers["Accept"]),
                         ("Bearer sk-stab-123456789", "application/json"))
        fields, files = sent.form()
        self.assertEqual(fields, {"prompt": "a lake", "aspect_ratio": "16:9", "negative_prompt": "fog", "seed": "7",
                                  "output_format": "webp"})
        self.assertEqual(files, [])

    def test_quality_picks_the_endpoint(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, stability)
            make_channel(kind="stability", base_url=up.url, models="dall-e-3", config={"endpoint": "core"})
            self.generate({"model": "dall-e-3", "prompt": "a", "quality": "hd"})
        self.assertEqual(up.requests[0].path, "/v2beta/stable-image/generate/ultra")

    def test_a_filtered_image_and_a_moderation_error_are_refusals(self) -> None:
        for status, body in ((200, {"image": png_b64(), "finish_reason": "CONTENT_FILTERED", "seed": 1}),
                             (403, {"id": "x", "name": "content_moderation", "errors": ["flagged"]})):
            with self.subTest(status=status), FakeUpstream() as up:
                up.respond(status, body)
                make_channel(kind="stability", base_url=up.url, models=f"sd{status}")
                assert_openai_error(self.generate({"model": f"sd{status}", "prompt": "x"}), 400,
                                    "invalid_request_error", "content_policy_violation")

    def test_an_inpaint_edit_sends_the_mask_as_white_repaints(self) -> None:
        hole = (2, 2, 6, 6)
        with FakeUpstream() as up:
            up.respond(200, stability)
            make_channel(kind="stability", base_url=up.url, models="sd")
            r = self.client.post("/v1/images/edits", {
                "model": "sd", "prompt": "a boat", "image": SimpleUploadedFile("a.png", image_bytes(8, 8)),
                "mask": SimpleUploadedFile("m.png", mask_png(8, 8, hole=hole))},
                headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/v2beta/stable-image/edit/inpaint")
        fields, files = sent.form()
        self.assertEqual(fields["prompt"], "a boat")
        self.assertEqual([f.name for f in files], ["image", "mask"])
        mask = Image.open(io.BytesIO(files[1].data))
        self.assertEqual(mask.mode, "L")
        self.assertEqual((mask.getpixel((3, 3)), mask.getpixel((0, 0)), mask.getpixel((7, 7))), (255, 0, 0))

    def test_its_rate_limit_fails_over(self) -> None:
        with FakeUpstream() as limited, FakeUpstream() as other:
            limited.respond(429, {"id": "x", "name": "rate_limit_exceeded", "errors": ["150 requests in 10 s"]})
            other.respond(200, stability)
            make_channel(kind="stability", base_url=limited.url, models="sd", priority=1)
            make_channel(kind="stability", base_url=other.url, models="sd")
            self.assertEqual(self.generate({"model": "sd", "prompt": "x"}).status_code, 200)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_posts_a_form_to_the_quality_endpoint_with_the_nearest_aspect_ratio() -> None:
    upstream = get_adapter("stability").build_request(request(model="sd3", size="1792x1024", quality="hd"),
                                                      target("stability", base_url="https://api.stability.ai"))
    assert upstream.url == "https://api.stability.ai/v2beta/stable-image/generate/ultra"
    assert upstream.headers == {"Authorization": f"Bearer {KEY}", "Accept": "application/json"}
    assert upstream.form is not None and upstream.form["prompt"] == "a red fox"
    assert upstream.form["aspect_ratio"] == "16:9"


def test_an_edit_goes_to_inpaint_with_the_image_file() -> None:
    upstream = get_adapter("stability").build_request(request("edits", model="sd3", images=(png_input(),)),
                                                      target("stability"))
    assert upstream.url.endswith("/v2beta/stable-image/edit/inpaint")
    assert [part.field for part in upstream.files] == ["image"]


def test_a_filtered_image_is_a_refusal_not_a_blurred_picture() -> None:
    adapter, req, channel = get_adapter("stability"), request(model="sd3"), target("stability")
    result = adapter.parse_response(answer(200, {"image": "aGk=", "finish_reason": "SUCCESS"}), req, channel)
    assert isinstance(result, ImagesResponse) and result.data[0].b64_json == "aGk="
    try:
        adapter.parse_response(answer(200, {"image": "aGk=", "finish_reason": "CONTENT_FILTERED"}), req, channel)
    except ContentPolicyViolation:
        pass
    else:
        raise AssertionError("a filtered image was delivered")
    assert isinstance(adapter.parse_error(answer(403, {"name": "unauthorized", "errors": ["bad key"]}), channel),
                      UpstreamKeyRejected)
