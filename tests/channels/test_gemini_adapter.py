from __future__ import annotations

import base64
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile

from channels.adapters import get_adapter
from channels.models import key_fingerprint
from openopen8.core.errors import ContentPolicyViolation
from openopen8.core.schemas import ImagesResponse
from tests.adapters import KEY, answer, png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, png_b64, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded

GEMINI_OK = {"candidates": [{"content": {"role": "model", "parts": [
    {"text": "Here it is."}, {"inlineData": {"mimeType": "image/png", "data": png_b64(5, 5)}}]},
    "finishReason": "STOP"}], "usageMetadata": {"totalTokenCount": 1300}}


class GeminiAdapterTests(ApiTestCase):
    def test_gemini_models_use_generate_content_with_an_image_modality(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, GEMINI_OK)
            make_channel(kind="gemini", base_url=up.url + "/v1beta", api_key="AIza-key-123456789", models="nano",
                         model_map={"nano": "gemini-3-pro-image-preview"})
            r = self.generate({"model": "nano", "prompt": "a robot", "n": 2, "size": "1792x1024", "quality": "hd",
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual([base64.b64decode(d["b64_json"]) for d in r.json()["data"]], [png_bytes(5, 5)] * 2)
        sent = up.requests[0]
        self.assertEqual((sent.path, sent.headers["x-goog-api-key"]),
                         ("/v1beta/models/gemini-3-pro-image-preview:generateContent", "AIza-key-123456789"))
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
                                                 "parameters": {"sampleCount": 3, "includeRaiReason": True,
                                                                "aspectRatio": "4:3"}})

    def test_blocked_prompts_and_filtered_images_are_refusals(self) -> None:
        for body in ({"promptFeedback": {"blockReason": "SAFETY"}},
                     {"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}]},
                     {"candidates": [{"finishReason": "IMAGE_OTHER", "finishMessage": "Unable to show the generated "
                                      "image. You will not be charged for this request."}]},
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

    def test_imagen_answering_nothing_is_a_refusal_not_a_broken_channel(self) -> None:
        # Imagen drops filtered images; when it drops them all, the answer is {}.
        with FakeUpstream() as imagen, FakeUpstream() as other:
            imagen.respond(200, {})
            other.respond(200, {"predictions": [{"bytesBase64Encoded": png_b64()}]})
            make_channel(kind="gemini", base_url=imagen.url, models="imagen", priority=5,
                         model_map={"imagen": "imagen-4.0-generate-001"})
            make_channel(kind="gemini", base_url=other.url, models="imagen",
                         model_map={"imagen": "imagen-4.0-generate-001"})
            r = self.generate({"model": "imagen", "prompt": "x"})
        assert_openai_error(r, 400, "invalid_request_error", "content_policy_violation")
        self.assertEqual(other.requests, [])

    def test_gemini_sizes_follow_what_each_model_documents(self) -> None:
        cases = [  # provider model, size, quality -> imageConfig
            ("gemini-2.5-flash-image", "1152x896", "auto", {"aspectRatio": "5:4"}),
            ("gemini-2.5-flash-image", "896x1152", "high", {"aspectRatio": "4:5"}),  # 1K only: no imageSize
            ("gemini-3-pro-image-preview", "1024x1024", "hd", {"aspectRatio": "1:1", "imageSize": "2K"}),
            ("gemini-3-pro-image-preview", "3840x2160", "auto", {"aspectRatio": "16:9", "imageSize": "4K"}),
            ("gemini-3-pro-image-preview", "1536x1024", "medium", {"aspectRatio": "3:2"}),
            ("gemini-3.1-flash-image-preview", "1024x4096", "low", {"aspectRatio": "1:4", "imageSize": "4K"}),
            ("gemini-2.5-flash-image", "1024x4096", "low", {"aspectRatio": "9:16"}),
        ]
        with FakeUpstream() as up:
            up.respond(200, GEMINI_OK)
            for model, size, quality, _ in cases:
                make_channel(kind="gemini", base_url=up.url, models=model)
                r = self.generate({"model": model, "prompt": "x", "size": size, "quality": quality})
                self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual([q.json()["generationConfig"]["imageConfig"] for q in up.requests], [c[3] for c in cases])

    def test_a_channel_can_name_the_tiers_of_a_model_the_gateway_does_not_know(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, GEMINI_OK)
            make_channel(kind="gemini", base_url=up.url, models="gemini-9-image", config={"image_sizes": ["2K", "1K"]})
            self.assertEqual(self.generate({"model": "gemini-9-image", "prompt": "x", "size": "3840x2160"}).status_code,
                             200)
            make_channel(kind="gemini", base_url=up.url, models="gemini-8-image")
            self.assertEqual(self.generate({"model": "gemini-8-image", "prompt": "x", "size": "3840x2160"}).status_code,
                             200)
        self.assertEqual([q.json()["generationConfig"]["imageConfig"] for q in up.requests],
                         [{"aspectRatio": "16:9", "imageSize": "2K"}, {"aspectRatio": "16:9"}])


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    """An error body as the Gemini API sends it (Google's error model)."""
    body: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        body["details"] = list(details)
    return {"error": body}


def error_info(reason: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"}}


INVALID_KEY = google_error(400, "INVALID_ARGUMENT", "API key not valid. Please pass a valid API key.",
                           error_info("API_KEY_INVALID"),
                           {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
                            "message": "API key not valid. Please pass a valid API key."})
MODELS = {"models": [{"name": "models/gemini-2.5-flash-image"}]}


class GeminiErrorTests(ApiTestCase):
    def test_an_invalid_key_is_set_aside_and_the_channels_other_key_serves(self) -> None:
        def provider(request: Recorded) -> Any:
            return (400, INVALID_KEY) if request.headers["x-goog-api-key"] == "AIza-bad-000000001" else GEMINI_OK

        with FakeUpstream() as up:
            up.respond(200, provider)
            channel = make_channel(kind="gemini", base_url=up.url, models="nano",
                                   api_key="AIza-bad-000000001\nAIza-good-00000002")
            answers = [self.generate({"model": "nano", "prompt": "a"}).status_code for _ in range(3)]
        self.assertEqual(answers, [200] * 3)
        used = [r.headers["x-goog-api-key"] for r in up.requests]
        self.assertEqual(used.count("AIza-bad-000000001"), 1)
        self.assertNotIn("GET", [r.method for r in up.requests])  # the reason names the key: no probe needed
        channel.refresh_from_db()
        self.assertEqual(list(channel.disabled_keys), [key_fingerprint("AIza-bad-000000001")])

    def test_a_channel_whose_only_key_is_invalid_is_not_the_clients_fault(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, INVALID_KEY)
            channel = make_channel(kind="gemini", base_url=up.url, models="nano")
            r = self.generate({"model": "nano", "prompt": "a"})
        assert_openai_error(r, 502, "server_error", "upstream_error")
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)
        self.assertIn("API key not valid", channel.disabled_reason)

    def test_permission_denied_sets_the_key_aside_when_a_probe_of_it_is_refused_too(self) -> None:
        leaked = google_error(403, "PERMISSION_DENIED", "Your API key was reported as leaked. Please use another "
                              "API key.")
        with FakeUpstream() as up:
            up.respond(403, leaked)
            channel = make_channel(kind="gemini", base_url=up.url, models="nano")
            assert_openai_error(self.generate({"model": "nano", "prompt": "a"}), 502, "server_error", "upstream_error")
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)
        self.assertIn("reported as leaked", channel.disabled_reason)
        self.assertEqual([(r.method, r.path) for r in up.requests], [("POST", "/models/nano:generateContent"),
                                                                     ("GET", "/models")])

    def test_permission_denied_for_one_request_while_the_key_works_is_the_clients_answer(self) -> None:
        def provider(request: Recorded) -> Any:
            if request.method == "GET":
                return 200, MODELS
            return 403, google_error(403, "PERMISSION_DENIED", "You do not have permission to access tuned model "
                                     "tunedModels/x.")

        with FakeUpstream() as up:
            up.respond(200, provider)
            channel = make_channel(kind="gemini", base_url=up.url, models="nano")
            error = assert_openai_error(self.generate({"model": "nano", "prompt": "a"}), 403, "invalid_request_error",
                                        "upstream_permission_denied")
        self.assertIn("tuned model", error["message"])
        channel.refresh_from_db()
        self.assertEqual((channel.enabled, channel.disabled_keys), (True, {}))

    def test_resource_exhausted_is_a_rate_limit_with_googles_retry_delay(self) -> None:
        exhausted = google_error(429, "RESOURCE_EXHAUSTED", "You exceeded your current quota.",
                                 {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": []},
                                 {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "36.5s"})
        with FakeUpstream() as limited, FakeUpstream() as other:
            limited.respond(429, exhausted)
            other.respond(200, GEMINI_OK)
            make_channel(kind="gemini", base_url=limited.url, models="nano", priority=5)
            alone = self.generate({"model": "nano", "prompt": "a"})
            make_channel(kind="gemini", base_url=other.url, models="nano")
            self.assertEqual(self.generate({"model": "nano", "prompt": "a"}).status_code, 200)
        assert_openai_error(alone, 503, "server_error", "service_unavailable")
        self.assertEqual(alone["Retry-After"], "37")
        self.assertEqual((len(limited.requests), len(other.requests)), (2, 1))  # failed over, not the client's 4xx

    def test_server_faults_fail_over_and_bad_requests_are_the_clients(self) -> None:
        for status, code, body in ((500, "INTERNAL", "An internal error has occurred."),
                                   (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
                                   (504, "DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
                                   (400, "FAILED_PRECONDITION", "User location is not supported for the API use.")):
            with self.subTest(code=code), FakeUpstream() as broken, FakeUpstream() as other:
                broken.respond(status, google_error(status, code, body))
                other.respond(200, GEMINI_OK)
                make_channel(kind="gemini", base_url=broken.url, models=code, priority=5)
                make_channel(kind="gemini", base_url=other.url, models=code)
                self.assertEqual(self.generate({"model": code, "prompt": "a"}).status_code, 200)
                self.assertEqual(len(other.requests), 1)
        with FakeUpstream() as up:
            up.respond(400, google_error(400, "INVALID_ARGUMENT", "Unsupported MIME type: image/gif"))
            make_channel(kind="gemini", base_url=up.url, models="nano")
            error = assert_openai_error(self.generate({"model": "nano", "prompt": "x"}), 400, "invalid_request_error")
        self.assertIn("Unsupported MIME type", error["message"])


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_imagen_is_asked_through_predict_and_gemini_through_generate_content() -> None:
    adapter, channel = get_adapter("gemini"), target("gemini", base_url="https://gl.example/v1beta")
    imagen = adapter.build_request(request(model="imagen-4.0-generate-001", n=2, size="1792x1024"), channel)
    assert imagen.url == "https://gl.example/v1beta/models/imagen-4.0-generate-001:predict"
    assert imagen.headers == {"x-goog-api-key": KEY}
    assert imagen.json is not None
    assert imagen.json["parameters"] == {"sampleCount": 2, "includeRaiReason": True, "aspectRatio": "16:9"}
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
