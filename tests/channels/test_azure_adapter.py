from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile

from channels.adapters import get_adapter
from channels.models import Channel
from openopen8.core.errors import ContentPolicyViolation, UpstreamKeyRejected
from tests.adapters import KEY, answer, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, mask_png, openai_images
from tests.fake_upstream import FakeUpstream


class AzureAdapterTests(ApiTestCase):
    def channel(self, url: str, **fields: object) -> Channel:
        return make_channel(kind="azure", base_url=url, api_key="azure-key-123456789", models="dall-e-3,gpt-image-1.5",
                            model_map={"dall-e-3": "my-dalle3", "gpt-image-1.5": "gptimg"},
                            config={"api_version": "2024-02-01"}, **fields)

    def test_it_calls_the_deployment_with_api_version_and_the_api_key_header(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            self.channel(up.url)
            r = self.generate({"model": "dall-e-3", "prompt": "a fox", "quality": "hd", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/openai/deployments/my-dalle3/images/generations?api-version=2024-02-01")
        self.assertEqual(sent.headers["api-key"], "azure-key-123456789")
        self.assertIsNone(sent.headers.get("Authorization"))
        self.assertEqual(sent.json(), {"prompt": "a fox", "n": 1, "quality": "hd", "response_format": "b64_json"})

    def test_edits_go_to_the_deployments_edits_path_as_multipart(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            self.channel(up.url)
            r = self.client.post("/v1/images/edits", {
                "model": "gpt-image-1.5", "prompt": "p", "image": SimpleUploadedFile("a.png", image_bytes(16, 16)),
                "mask": SimpleUploadedFile("m.png", mask_png(16, 16, hole=(0, 0, 4, 4)))},
                headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(r.status_code, 200, r.content)
        fields, files = up.requests[0].form()
        self.assertEqual(up.requests[0].path, "/openai/deployments/gptimg/images/edits?api-version=2024-02-01")
        self.assertEqual(([f.name for f in files], "model" in fields), (["image", "mask"], False))

    def test_the_content_filter_is_a_refusal_in_either_shape(self) -> None:
        for body in ({"error": {"code": "contentFilter", "message": "Your task failed as a result of our safety "
                                                                    "system."}},
                     {"error": {"code": "content_policy_violation", "message": "Blocked.",
                                "inner_error": {"code": "ResponsibleAIPolicyViolation"}}}):
            with self.subTest(body=body), FakeUpstream() as up:
                Channel.objects.all().delete()
                up.respond(400, body)
                self.channel(up.url)
                assert_openai_error(self.generate({"model": "dall-e-3", "prompt": "x"}), 400,
                                    "invalid_request_error", "content_policy_violation")

    def test_a_rejected_key_disables_the_channel(self) -> None:
        with FakeUpstream() as up:
            up.respond(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}})
            channel = self.channel(up.url)
            r = self.generate({"model": "dall-e-3", "prompt": "x"})
        assert_openai_error(r, 502, "server_error", "upstream_error")
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)
        self.assertNotIn("azure-key-123456789", r.content.decode())

    def test_azure_channels_cannot_serve_variations_and_check_their_config(self) -> None:
        with FakeUpstream() as up:
            channel = self.channel(up.url)
        channel.endpoints = "generations,variations"
        with self.assertRaises(ValidationError):
            channel.full_clean()
        channel.endpoints, channel.config = "generations", {"api_version": "latest"}
        with self.assertRaises(ValidationError):
            channel.full_clean()


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_calls_the_deployment_with_the_api_key_header_and_no_model_field() -> None:
    channel = target("azure", base_url="https://res.openai.azure.com", config={"api_version": "2025-04-01-preview"},
                     model_map={"gpt-image-1.5": "my-deployment"})
    upstream = get_adapter("azure").build_request(request(model="gpt-image-1.5"), channel)
    assert upstream.url == ("https://res.openai.azure.com/openai/deployments/my-deployment/images/generations"
                            "?api-version=2025-04-01-preview")
    assert upstream.headers == {"api-key": KEY}
    assert upstream.json is not None and "model" not in upstream.json and upstream.json["prompt"] == "a red fox"


def test_a_content_filter_answer_is_the_clients_refusal_and_a_rejected_key_the_channels() -> None:
    adapter, channel = get_adapter("azure"), target("azure")
    filtered = {"error": {"code": "content_policy_violation", "message": "filtered",
                          "inner_error": {"code": "ResponsibleAIPolicyViolation"}}}
    assert isinstance(adapter.parse_error(answer(400, filtered), channel), ContentPolicyViolation)
    assert isinstance(adapter.parse_error(answer(401, {"error": {"code": "401", "message": "Access denied"}}),
                                          channel), UpstreamKeyRejected)
