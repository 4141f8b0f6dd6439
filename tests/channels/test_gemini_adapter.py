from __future__ import annotations

import base64

from django.core.files.uploadedfile import SimpleUploadedFile

from channels.adapters import get_adapter
from openopen8.core.errors import ContentPolicyViolation
from openopen8.core.schemas import ImagesResponse
from tests.adapters import KEY, answer, png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, png_b64, png_bytes
from tests.fake_upstream import FakeUpstream

GEMINI_OK = {"candidates": [{"content": {"role": "model", "parts": [
    {"text": "Here it is."}, {"inlineData": {"mimeType": "image/png", "data": png_b64(5, 5)}}]},
    "finishReason": "STOP"}], "usageMetadata": {"totalTokenCount": 1300}}


class GeminiAdapterTests(ApiTestCase):
    def test_gemini_models_use_generate_content_with_an_image_modality(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, GEMINI_OK)
            make_channel(kind="gemini", base_url=up.url + "/v1beta", api_key="AIza-key-123456789", models="nano",
                         model_map={"nano": "gemini-2.5-flash-image"})
            r = self.generate({"model": "nano", "prompt": "a robot", "n": 2, "size": "1792x1024", "quality": "hd",
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual([base64.b64decode(d["b64_json"]) for d in r.json()["data"]], [png_bytes(5, 5)] * 2)
        sent = up.requests[0]
        self.assertEqual((sent.path, sent.headers["x-goog-api-key"]),
                         ("/v1beta/models/gemini-2.5-flash-image:generateContent", "AIza-key-123456789"))
        self.assertEqual(sent.json(), {"contents": [{"role": "user", "parts": [{"text": "a robot"}]}],
                                       "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {
                                           "aspectRatio": "16:9", "imageSize": "2K"}}})
        self.assertEqual(len(up.requests), 2)

    def test_imagen_models_use_predict_with_a_sample_count(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"predictions": [{"bytesBase64Encoded": png_b64(), "mimeType": "image/png"}] * 3})
            make_channel(kind="gemini", base_url=up.url, models="imagen",
                         model_map={"imagen": "imagen-4.0-generate-001"})
            r = self.generate({"model": "imagen", "prompt": "a cat", "n": 3, "size": "1536x1024"})
        self.assertEqual(len(r.json()["data"]), 3)
        self.assertEqual(up.requests[0].path, "/models/imagen-4.0-generate-001:predict")
        self.assertEqual(up.requests[0].json(), {"instances": [{"prompt": "a cat"}],
                                                 "parameters": {"sampleCount": 3, "aspectRatio": "4:3"}})

    def test_blocked_prompts_and_filtered_images_are_refusals(self) -> None:
        for body in ({"promptFeedback": {"blockReason": "SAFETY"}},
                     {"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}]},
                     {"predictions": [{"raiFilteredReason": "Your prompt was filtered."}]}):
            with self.subTest(body=body), FakeUpstream() as up:
                up.respond(200, body)
                make_channel(kind="gemini", base_url=up.url, models=f"g{len(str(body))}")
                assert_openai_error(self.generate({"model": f"g{len(str(body))}", "prompt": "x"}), 400,
                                    "invalid_request_error", "content_policy_violation")

    def test_an_edit_sends_the_images_as_inline_parts(self) -> None:
        source = image_bytes(12, 12, fmt="WEBP")
        with FakeUpstream() as up:
            up.respond(200, GEMINI_OK)
            make_channel(kind="gemini", base_url=up.url, models="nano")
            r = self.client.post("/v1/images/edits", {"model": "nano", "prompt": "add a hat",
                                                      "image": SimpleUploadedFile("a.webp", source, "image/webp")},
                                 headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(r.status_code, 200, r.content)
        parts = up.requests[0].json()["contents"][0]["parts"]
        self.assertEqual(parts[0], {"text": "add a hat"})
        self.assertEqual(parts[1]["inlineData"]["mimeType"], "image/webp")
        self.assertEqual(base64.b64decode(parts[1]["inlineData"]["data"]), source)

    def test_google_errors_are_mapped(self) -> None:
        with FakeUpstream() as up:
            up.respond(429, {"error": {"code": 429, "message": "Resource has been exhausted.",
                                       "status": "RESOURCE_EXHAUSTED"}})
            make_channel(kind="gemini", base_url=up.url, models="nano")
            r = self.generate({"model": "nano", "prompt": "x"})
            assert_openai_error(r, 503, "server_error", "service_unavailable")
            up.respond(400, {"error": {"code": 400, "message": "Invalid aspect ratio.", "status": "INVALID_ARGUMENT"}})
            error = assert_openai_error(self.generate({"model": "nano", "prompt": "x"}), 400, "invalid_request_error")
        self.assertIn("Invalid aspect ratio", error["message"])


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_imagen_is_asked_through_predict_and_gemini_through_generate_content() -> None:
    adapter, channel = get_adapter("gemini"), target("gemini", base_url="https://gl.example/v1beta")
    imagen = adapter.build_request(request(model="imagen-4.0-generate-001", n=2, size="1792x1024"), channel)
    assert imagen.url == "https://gl.example/v1beta/models/imagen-4.0-generate-001:predict"
    assert imagen.headers == {"x-goog-api-key": KEY}
    assert imagen.json is not None and imagen.json["parameters"] == {"sampleCount": 2, "aspectRatio": "16:9"}
    gemini = adapter.build_request(request("edits", model="gemini-2.5-flash-image", images=(png_input(),)), channel)
    assert gemini.url.endswith("/models/gemini-2.5-flash-image:generateContent")
    assert gemini.json is not None
    parts = gemini.json["contents"][0]["parts"]
    assert parts[0] == {"text": "a red fox"} and parts[1]["inlineData"]["mimeType"] == "image/png"


def test_images_are_read_from_candidates_and_a_block_without_images_is_a_refusal() -> None:
    adapter, req, channel = get_adapter("gemini"), request(model="gemini-2.5-flash-image"), target("gemini")
    body = {"candidates": [{"content": {"parts": [{"text": "here"}, {"inlineData": {"data": "aGk="}}]}}]}
    result = adapter.parse_response(answer(200, body), req, channel)
    assert isinstance(result, ImagesResponse) and [d.b64_json for d in result.data] == ["aGk="]
    try:
        adapter.parse_response(answer(200, {"promptFeedback": {"blockReason": "SAFETY"}}), req, channel)
    except ContentPolicyViolation:
        pass
    else:
        raise AssertionError("a blocked prompt was not a refusal")
