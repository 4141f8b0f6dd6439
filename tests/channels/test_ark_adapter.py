from __future__ import annotations

import base64

from django.core.files.uploadedfile import SimpleUploadedFile

from channels.adapters import get_adapter
from openopen8.core.errors import ContentPolicyViolation
from tests.adapters import KEY, answer, png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, png_b64
from tests.fake_upstream import FakeUpstream

ARK_OK = {"model": "doubao-seedream-4-0-250828", "created": 1757000000,
          "data": [{"b64_json": png_b64(), "size": "2048x2048"}],
          "usage": {"generated_images": 1, "output_tokens": 16384, "total_tokens": 16384}}


class ArkAdapterTests(ApiTestCase):
    def test_it_sends_seedream_fields_and_one_call_per_image(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, ARK_OK)
            make_channel(kind="ark", base_url=up.url + "/api/v3", api_key="ark-key-123456789", models="seedream",
                         model_map={"seedream": "doubao-seedream-4-0-250828"}, config={"watermark": False})
            r = self.generate({"model": "seedream", "prompt": "a temple", "n": 2, "seed": 11, "guidance_scale": 5.5,
                               "response_format": "url"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 2)
        self.assertNotIn("usage", r.json())
        sent = up.requests[0]
        self.assertEqual((sent.path, sent.headers["Authorization"]), ("/api/v3/images/generations",
                                                                       "Bearer ark-key-123456789"))
        self.assertEqual(sent.json(), {"model": "doubao-seedream-4-0-250828", "prompt": "a temple", "seed": 11,
                                       "guidance_scale": 5.5, "size": "2K", "response_format": "b64_json",
                                       "watermark": False})
        self.assertEqual(len(up.requests), 2)

    def test_an_explicit_size_passes_and_hd_asks_for_4k(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, ARK_OK)
            make_channel(kind="ark", base_url=up.url, models="seedream")
            self.generate({"model": "seedream", "prompt": "a", "size": "1536x1024"})
            self.generate({"model": "seedream", "prompt": "a", "quality": "hd"})
        self.assertEqual([r.json()["size"] for r in up.requests], ["1536x1024", "4K"])

    def test_images_carry_no_watermark_unless_the_client_or_the_channel_asks(self) -> None:
        # Ark's watermark defaults to true (a visible mark); OpenAI's images carry none.
        with FakeUpstream() as up:
            up.respond(200, ARK_OK)
            make_channel(kind="ark", base_url=up.url, models="seedream")
            make_channel(kind="ark", base_url=up.url, models="marked", config={"watermark": True})
            for model, asked in (("seedream", None), ("seedream", True), ("seedream", False), ("marked", False)):
                body = {"model": model, "prompt": "a"} if asked is None else {"model": model, "prompt": "a",
                                                                               "watermark": asked}
                self.assertEqual(self.generate(body).status_code, 200)
        self.assertEqual([r.json()["watermark"] for r in up.requests], [False, True, False, True])

    def test_reference_images_go_as_data_urls(self) -> None:
        source = image_bytes(20, 20, fmt="JPEG")
        with FakeUpstream() as up:
            up.respond(200, ARK_OK)
            make_channel(kind="ark", base_url=up.url, models="seededit")
            r = self.client.post("/v1/images/edits", {"model": "seededit", "prompt": "make it winter",
                                                      "image": SimpleUploadedFile("a.jpg", source, "image/jpeg")},
                                 headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(r.status_code, 200, r.content)
        image = up.requests[0].json()["image"]
        self.assertTrue(image.startswith("data:image/jpeg;base64,"))
        self.assertEqual(base64.b64decode(image.split(",", 1)[1]), source)

    def test_sensitive_content_is_a_refusal_and_a_failed_image_in_a_group_is_dropped(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"code": "OutputImageSensitiveContentDetected", "message": "The output image "
                                       "may contain sensitive information.", "param": "", "type": "BadRequest"}})
            make_channel(kind="ark", base_url=up.url, models="seedream")
            assert_openai_error(self.generate({"model": "seedream", "prompt": "x"}), 400, "invalid_request_error",
                                "content_policy_violation")
            up.respond(200, {**ARK_OK, "data": [{"b64_json": png_b64()},
                                                {"error": {"code": "OutputImageSensitiveContentDetected"}}]})
            r = self.generate({"model": "seedream", "prompt": "x", "sequential_image_generation": "auto"})
        self.assertEqual(len(r.json()["data"]), 1)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_drops_openai_only_fields_and_picks_a_size_tier() -> None:
    upstream = get_adapter("ark").build_request(request(model="seedream-4-0", quality="hd", user="u1"),
                                                target("ark", base_url="https://ark.example/api/v3"))
    assert upstream.url == "https://ark.example/api/v3/images/generations"
    assert upstream.headers == {"Authorization": f"Bearer {KEY}"}
    assert upstream.json is not None
    assert (upstream.json["size"], upstream.json["response_format"]) == ("4K", "b64_json")
    assert "n" not in upstream.json and "user" not in upstream.json


def test_reference_images_go_as_data_urls() -> None:
    upstream = get_adapter("ark").build_request(request("edits", model="seedream-4-0", images=(png_input(),)),
                                                target("ark"))
    assert upstream.json is not None and upstream.json["image"].startswith("data:image/png;base64,")


def test_its_moderation_codes_are_refusals() -> None:
    error = get_adapter("ark").parse_error(answer(400, {"error": {"code": "OutputImageSensitiveContentDetected",
                                                                  "message": "sensitive"}}), target("ark"))
    assert isinstance(error, ContentPolicyViolation) and not error.channel_fault
