from __future__ import annotations

# The SDK types every response field as optional; these tests check the values themselves.
# mypy: disable-error-code="union-attr,index,arg-type"
import base64
import io
import json
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
import requests
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import LiveServerTestCase, override_settings
from PIL import Image

from gateway.models import ApiToken, UsageLog
from tests.base import ApiTestCase, assert_openai_error, post_json
from tests.factories import (
    bomb_png,
    image_bytes,
    make_channel,
    make_token,
    mask_png,
    noise_png,
    openai_images,
    restore_default_prices,
)
from tests.fake_upstream import FakeUpstream, Recorded, a1111_answer


def upload(data: bytes, name: str = "image.png", content_type: str = "image/png") -> SimpleUploadedFile:
    return SimpleUploadedFile(name, data, content_type)


class UploadsTestCase(ApiTestCase):
    def edit(self, fields: dict[str, Any], key: str | None = "default", path: str = "/v1/images/edits") -> Any:
        token = self.key if key == "default" else key
        return self.client.post(path, data=fields, headers={"Authorization": f"Bearer {token}"})



class EditsApiTests(UploadsTestCase):
    def test_one_image_and_a_mask_reach_an_openai_provider_as_the_same_multipart_fields(self) -> None:
        source, mask = image_bytes(64, 64), mask_png(64, 64, hole=(0, 0, 32, 32))
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url + "/v1", api_key="sk-up-key-123456")
            r = self.edit({"model": "dall-e-2", "prompt": "add a hat", "n": "2", "size": "256x256",
                           "response_format": "b64_json", "image": upload(source), "mask": upload(mask, "m.png"),
                           "custom_field": "kept"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 2)
        sent = up.requests[0]
        self.assertEqual((sent.path, sent.headers["Authorization"]), ("/v1/images/edits", "Bearer sk-up-key-123456"))
        fields, files = sent.form()
        self.assertEqual(fields, {"model": "dall-e-2", "prompt": "add a hat", "n": "2", "size": "256x256",
                                  "response_format": "b64_json", "custom_field": "kept"})
        self.assertEqual([(f.name, f.content_type, f.data) for f in files],
                         [("image", "image/png", source), ("mask", "image/png", mask)])

    def test_several_images_go_upstream_as_image_array_parts(self) -> None:
        images = [image_bytes(40, 30, fmt="JPEG"), image_bytes(50, 50, fmt="WEBP"), image_bytes(16, 16)]
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = self.edit({"model": "gpt-image-1.5", "prompt": "combine them", "input_fidelity": "high",
                           "output_compression": "50", "output_format": "webp",
                           "image[]": [upload(images[0], "a.jpg", "image/jpeg"), upload(images[1], "b.webp"),
                                       upload(images[2], "c.png")]})
        self.assertEqual(r.status_code, 200, r.content)
        fields, files = up.requests[0].form()
        self.assertEqual([(f.name, f.content_type, f.data) for f in files],
                         [("image[]", "image/jpeg", images[0]), ("image[]", "image/webp", images[1]),
                          ("image[]", "image/png", images[2])])
        self.assertEqual((fields["input_fidelity"], fields["output_compression"]), ("high", "50"))
        self.assertNotIn("response_format", fields)
        log = UsageLog.objects.get()
        self.assertEqual((log.endpoint, log.input_images, log.input_bytes), ("edits", 3, sum(map(len, images))))

    def test_a_json_edit_with_a_data_url_is_forwarded_as_multipart(self) -> None:
        source = image_bytes(20, 20)
        data_url = "data:image/png;base64," + base64.b64encode(source).decode()
        mask = mask_png(20, 20, hole=(5, 5, 10, 10))
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = self.generate_at("/v1/images/edits", {
                "model": "gpt-image-1.5", "prompt": "make it blue", "images": [{"image_url": data_url}],
                "mask": {"image_url": "data:image/png;base64," + base64.b64encode(mask).decode()}})
        self.assertEqual(r.status_code, 200, r.content)
        fields, files = up.requests[0].form()
        self.assertEqual([(f.name, f.data) for f in files], [("image", source), ("mask", mask)])
        self.assertNotIn("images", fields)

    def test_a_json_edit_fetches_an_http_url_only_where_the_operator_allows_private_addresses(self) -> None:
        source = image_bytes(24, 24)
        with FakeUpstream() as files, FakeUpstream() as up:
            url = files.serve_file("/in.png", source)
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-1.5")
            body = {"model": "gpt-image-1.5", "prompt": "p", "images": [{"image_url": url}]}
            refused = self.generate_at("/v1/images/edits", body)
            error = assert_openai_error(refused, 400, "invalid_request_error", param="images")
            self.assertIn("private or local address", error["message"])
            self.assertEqual((files.requests, up.requests), ([], []))
            with override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True):
                r = self.generate_at("/v1/images/edits", body)
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(up.requests[0].form()[1][0].data, source)

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_an_unreachable_client_image_url_is_said_to_be_the_clients_url_not_the_provider(self) -> None:
        closed = socket.socket()
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/in.png"
        closed.close()
        with FakeUpstream() as up:
            make_channel(base_url=up.url, models="gpt-image-1.5")
            r = self.generate_at("/v1/images/edits", {"model": "gpt-image-1.5", "prompt": "p",
                                                      "images": [{"image_url": url}]})
        error = assert_openai_error(r, 400, "invalid_request_error", param="images")
        self.assertIn("image URL's server could not be reached", error["message"])
        self.assertNotIn("provider", error["message"])

    def generate_at(self, path: str, body: Any) -> Any:
        return post_json(self.client, path, body, self.key)

    def refused(self, fields: dict[str, Any], param: str, *, model_channel: str = "dall-e-2") -> dict[str, Any]:
        """Post an edit that must be refused with 400 naming ``param``, reaching no provider and costing nothing."""
        token, key = make_token(name=f"t{ApiToken.objects.count()}", budget="5")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models=model_channel)
            r = self.edit({"prompt": "p", **fields}, key=key)
        self.assertEqual(r.status_code, 400, r.content)
        error: dict[str, Any] = json.loads(r.content)["error"]
        self.assertEqual((error["type"], error["param"]), ("invalid_request_error", param))
        self.assertEqual(up.requests, [])
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 0)
        return error

    def test_dall_e_2_refuses_a_jpeg_even_when_it_is_named_png(self) -> None:
        error = self.refused({"model": "dall-e-2", "image": upload(image_bytes(32, 32, fmt="JPEG"), "x.png")}, "image")
        self.assertIn("PNG", error["message"])

    def test_dall_e_2_refuses_a_non_square_image(self) -> None:
        self.refused({"model": "dall-e-2", "image": upload(image_bytes(64, 32))}, "image")

    def test_dall_e_2_refuses_an_image_over_4_mb(self) -> None:
        big = noise_png(1300)
        self.assertGreater(len(big), 4 * 1024 * 1024)
        error = self.refused({"model": "dall-e-2", "image": upload(big)}, "image")
        self.assertIn("4 MB", error["message"])

    def test_dall_e_2_takes_exactly_one_image(self) -> None:
        self.refused({"model": "dall-e-2", "image[]": [upload(image_bytes(8, 8)), upload(image_bytes(8, 8))]}, "image")

    def test_a_truncated_or_corrupt_file_is_refused(self) -> None:
        whole = noise_png(64)
        self.refused({"model": "dall-e-2", "image": upload(whole[: len(whole) // 2])}, "image")
        self.refused({"model": "dall-e-2", "image": upload(b"\x89PNG\r\n\x1a\n" + b"garbage" * 100)}, "image")
        self.refused({"model": "dall-e-2", "image": upload(b"just text")}, "image")

    def test_a_decompression_bomb_is_refused(self) -> None:
        bomb = bomb_png()
        self.assertLess(len(bomb), 200_000)
        error = self.refused({"model": "gpt-image-1.5", "image": upload(bomb)}, "image", model_channel="gpt-image-1.5")
        self.assertIn("pixel", error["message"])

    def test_a_mask_must_match_the_image_and_have_alpha(self) -> None:
        self.refused({"model": "dall-e-2", "image": upload(image_bytes(64, 64)),
                      "mask": upload(mask_png(32, 32, hole=(0, 0, 8, 8)))}, "mask")
        self.refused({"model": "dall-e-2", "image": upload(image_bytes(64, 64)),
                      "mask": upload(image_bytes(64, 64))}, "mask")
        self.refused({"model": "dall-e-2", "image": upload(image_bytes(64, 64)),
                      "mask": upload(image_bytes(64, 64, fmt="JPEG"))}, "mask")

    def test_seventeen_images_are_refused(self) -> None:
        images = [upload(image_bytes(8, 8), f"{i}.png") for i in range(17)]
        error = self.refused({"model": "gpt-image-1.5", "image[]": images}, "image", model_channel="gpt-image-1.5")
        self.assertIn("16", error["message"])

    def test_a_missing_image_and_a_file_id_are_refused(self) -> None:
        self.refused({"model": "dall-e-2"}, "image")
        r = self.generate_at("/v1/images/edits", {"model": "gpt-image-1.5", "prompt": "p",
                                                  "images": [{"file_id": "file-123"}]})
        assert_openai_error(r, 400, "invalid_request_error", "unsupported_parameter", "images")

    def test_dall_e_3_cannot_edit(self) -> None:
        self.refused({"model": "dall-e-3", "image": upload(image_bytes(8, 8))}, "model", model_channel="dall-e-3")

    @override_settings(OPENOPEN8_MAX_REQUEST_BYTES=10_000)
    def test_a_body_over_the_servers_cap_is_413(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5")
        r = self.edit({"model": "gpt-image-1.5", "prompt": "p", "image": upload(noise_png(100))})
        assert_openai_error(r, 413, "invalid_request_error", "request_too_large")

    def test_a_model_whose_channels_cannot_edit_gets_a_clear_400(self) -> None:
        make_channel(base_url="http://127.0.0.1:9", models="gpt-image-1.5", endpoints="generations")
        r = self.edit({"model": "gpt-image-1.5", "prompt": "p", "image": upload(image_bytes(8, 8))})
        error = assert_openai_error(r, 400, "invalid_request_error", "unsupported_model", "model")
        self.assertIn("edits", error["message"])

    def test_edits_are_routed_only_to_channels_that_take_the_inputs(self) -> None:
        with FakeUpstream() as webui, FakeUpstream() as openai_up:
            webui.respond(200, a1111_answer)
            openai_up.respond(200, openai_images(1))
            make_channel(kind="sd-webui", base_url=webui.url, api_key="", models="gpt-image-1.5", priority=10)
            make_channel(base_url=openai_up.url, models="gpt-image-1.5", priority=0)
            r = self.edit({"model": "gpt-image-1.5", "prompt": "p",
                           "image[]": [upload(image_bytes(8, 8)), upload(image_bytes(8, 8))]})
            self.assertEqual(r.status_code, 200, r.content)
            self.assertEqual((len(webui.requests), len(openai_up.requests)), (0, 1))
            one = self.edit({"model": "gpt-image-1.5", "prompt": "p", "image": upload(image_bytes(8, 8))})
            self.assertEqual(one.status_code, 200)
            self.assertEqual(len(webui.requests), 1)

    def test_edits_are_priced_like_dall_e_2_generations(self) -> None:
        token, key = make_token(name="payer", budget="1")
        make_channel(kind="placeholder")
        r = self.edit({"model": "dall-e-2", "prompt": "p", "n": "3", "size": "512x512",
                       "image": upload(image_bytes(64, 64))}, key=key)
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 3 * 18000)

    def test_the_placeholder_answers_an_edit_at_the_inputs_size(self) -> None:
        make_channel(kind="placeholder", models="gpt-image-1.5")
        r = self.edit({"model": "gpt-image-1.5", "prompt": "p", "image": upload(image_bytes(300, 200, fmt="JPEG"))})
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        self.assertEqual(image.size, (300, 200))


class VariationsApiTests(UploadsTestCase):
    def test_a_variation_reaches_an_openai_provider_as_multipart(self) -> None:
        source = image_bytes(32, 32)
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url)
            r = self.edit({"image": upload(source), "n": "2", "size": "256x256", "response_format": "url"},
                          path="/v1/images/variations")
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 2)
        sent = up.requests[0]
        fields, files = sent.form()
        self.assertEqual(sent.path, "/images/variations")
        self.assertEqual(fields, {"model": "dall-e-2", "n": "2", "size": "256x256", "response_format": "url"})
        self.assertEqual([(f.name, f.data) for f in files], [("image", source)])
        self.assertEqual(UsageLog.objects.get().endpoint, "variations")

    def test_a_variation_is_refused_for_a_non_square_image(self) -> None:
        make_channel(kind="placeholder")
        r = self.edit({"image": upload(image_bytes(30, 20))}, path="/v1/images/variations")
        assert_openai_error(r, 400, "invalid_request_error", param="image")



class UploadLifecycleTests(LiveServerTestCase):
    """Uploads past the in-memory threshold live in temporary files only while their request runs."""

    def setUp(self) -> None:
        self.token, self.key = make_token()
        self.temp_dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.temp_dir, ignore_errors=True)

    def post_edit(self, image: bytes, model: str = "gpt-image-1.5") -> requests.Response:
        return requests.post(f"{self.live_server_url}/v1/images/edits", timeout=30,
                             headers={"Authorization": f"Bearer {self.key}"},
                             data={"model": model, "prompt": "p"}, files={"image": ("in.png", image, "image/png")})

    def wait_until_empty(self) -> list[str]:
        # The server closes a request's files just after answering it; give it a moment, then look.
        for _ in range(50):
            left = [p.name for p in self.temp_dir.iterdir()]
            if not left:
                break
            time.sleep(0.05)
        return left

    def test_a_large_upload_is_on_disk_during_the_request_and_gone_after_success_or_failure(self) -> None:
        big = noise_png(700)
        self.assertGreater(len(big), 1024 * 1024)
        seen: list[list[str]] = []

        def provider(request: Recorded) -> dict[str, Any]:
            seen.append([p.name for p in self.temp_dir.iterdir()])
            return openai_images(1)

        with override_settings(FILE_UPLOAD_TEMP_DIR=str(self.temp_dir)), FakeUpstream() as up:
            up.respond(200, provider)
            make_channel(base_url=up.url, models="gpt-image-1.5,dall-e-2")
            ok = self.post_edit(big)
            self.assertEqual(ok.status_code, 200, ok.text)
            self.assertEqual(len(seen[0]), 1)  # streamed to a temporary file, not held in memory
            self.assertEqual(self.wait_until_empty(), [])
            refused = self.post_edit(big[: len(big) // 2])  # truncated: refused after it was spooled to disk
            self.assertEqual(refused.status_code, 400)
            self.assertEqual(self.wait_until_empty(), [])
            up.respond(500, {"error": {"message": "down"}})  # accepted, then the provider fails
            failed = self.post_edit(big)
            self.assertEqual(failed.status_code, 502)
            self.assertEqual(self.wait_until_empty(), [])


class SdkEditTests(LiveServerTestCase):
    def setUp(self) -> None:
        restore_default_prices()
        self.token, self.key = make_token(budget="5")
        self.sdk = openai.OpenAI(base_url=f"{self.live_server_url}/v1", api_key=self.key, max_retries=0)

    def test_the_sdk_edits_with_several_images_and_a_mask(self) -> None:
        images = [image_bytes(32, 32), image_bytes(32, 32, fmt="JPEG")]
        mask = mask_png(32, 32, hole=(0, 0, 16, 16))
        with FakeUpstream() as up:
            up.respond(200, openai_images(1, usage={"total_tokens": 3}))
            make_channel(base_url=up.url + "/v1", models="gpt-image-1.5")
            result = self.sdk.images.edit(model="gpt-image-1.5", prompt="merge",
                                          image=[("a.png", images[0], "image/png"), ("b.jpg", images[1], "image/jpeg")],
                                          mask=("m.png", mask, "image/png"))
        self.assertEqual(len(result.data), 1)
        self.assertEqual(result.usage.total_tokens, 3)
        _fields, files = up.requests[0].form()
        self.assertEqual([(f.name, f.data) for f in files], [("image[]", images[0]), ("image[]", images[1]),
                                                             ("mask", mask)])

    def test_the_sdk_edits_a_single_dall_e_2_image_into_a_hosted_url(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        result = self.sdk.images.edit(model="dall-e-2", prompt="add a moon", size="256x256", response_format="url",
                                      image=("in.png", image_bytes(64, 64), "image/png"))
        image = requests.get(result.data[0].url, timeout=10)
        self.assertEqual(Image.open(io.BytesIO(image.content)).size, (256, 256))

    def test_the_sdk_creates_variations(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        result = self.sdk.images.create_variation(image=("in.png", image_bytes(64, 64), "image/png"), n=2,
                                                  size="512x512", response_format="b64_json")
        self.assertEqual(len(result.data), 2)
        self.assertEqual(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))).size, (512, 512))

    def test_the_sdk_sees_a_refused_upload_as_a_bad_request_naming_the_field(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        with self.assertRaises(openai.BadRequestError) as refused:
            self.sdk.images.create_variation(image=("in.png", image_bytes(64, 32), "image/png"))
        self.assertEqual(refused.exception.param, "image")
