from __future__ import annotations

import base64
import io
from typing import Any

from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from channels.adapters import get_adapter
from channels.adapters.sd_webui import SDWebUIAdapter
from openopen8.core.errors import UpstreamError
from openopen8.core.schemas import ImagesResponse
from tests.adapters import answer, png_input, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, mask_png, png_bytes
from tests.fake_upstream import FakeUpstream, a1111_answer


class SDWebUIAdapterTests(ApiTestCase):
    def test_it_translates_size_n_and_the_channels_config_to_txt2img(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, a1111_answer)
            make_channel(kind="sd-webui", base_url=up.url, api_key="", models="sdxl",
                         config={"steps": 30, "sampler": "DPM++ 2M", "cfg_scale": 5.5,
                                 "negative_prompt": "blurry", "quality_steps": {"hd": 50}})
            r = self.generate({"model": "sdxl", "prompt": "a castle", "n": 3, "size": "1536x1024",
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/sdapi/v1/txt2img")
        self.assertNotIn("Authorization", sent.headers)
        body = sent.json()
        self.assertEqual((body["prompt"], body["width"], body["height"], body["batch_size"], body["n_iter"]),
                         ("a castle", 1536, 1024, 3, 1))
        self.assertEqual((body["steps"], body["sampler_name"], body["cfg_scale"], body["negative_prompt"]),
                         (30, "DPM++ 2M", 5.5, "blurry"))
        self.assertNotIn("override_settings", body)
        data = r.json()["data"]
        self.assertEqual([base64.b64decode(d["b64_json"]) for d in data], [png_bytes(4 + i, 4) for i in range(3)])

    def test_it_skips_the_grid_and_hosts_urls(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, lambda req: a1111_answer(req, grid=True))
            make_channel(kind="sd-webui", base_url=up.url, api_key="", models="sdxl")
            r = self.generate({"model": "sdxl", "prompt": "a castle", "n": 2})
        urls = [d["url"] for d in r.json()["data"]]
        self.assertEqual(len(urls), 2)
        first = self.client.get(urls[0].removeprefix("http://testserver"))
        self.assertEqual(first.getvalue(), png_bytes(4, 4))

    def test_it_sends_basic_auth_quality_steps_and_the_mapped_checkpoint(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, a1111_answer)
            make_channel(kind="sd-webui", base_url=up.url, api_key="webui:s3cret", models="dall-e-3",
                         model_map={"dall-e-3": "sdxl_base_1.0.safetensors"}, config={"quality_steps": {"hd": 50}})
            r = self.generate({"model": "dall-e-3", "prompt": "a castle", "quality": "hd", "size": "1024x1792",
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual(sent.headers["Authorization"], "Basic " + base64.b64encode(b"webui:s3cret").decode())
        body = sent.json()
        self.assertEqual(body["override_settings"], {"sd_model_checkpoint": "sdxl_base_1.0.safetensors"})
        self.assertEqual((body["steps"], body["width"], body["height"]), (50, 1024, 1792))

    def test_a_rejected_request_is_the_channels_fault_and_fails_over(self) -> None:
        with FakeUpstream() as webui, FakeUpstream() as backup:
            webui.respond(404, {"error": "HTTPException", "detail": "Sampler not found", "body": "", "errors": ""})
            backup.respond(200, a1111_answer)
            make_channel(kind="sd-webui", base_url=webui.url, api_key="", models="sdxl", priority=1,
                         config={"sampler": "Nope"})
            make_channel(kind="sd-webui", base_url=backup.url, api_key="", models="sdxl", priority=0)
            r = self.generate({"model": "sdxl", "prompt": "a castle", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200)
        self.assertEqual(len(backup.requests), 1)

    def test_wrong_credentials_are_a_channel_fault_that_names_no_password(self) -> None:
        with FakeUpstream() as up:
            up.respond(401, {"error": "HTTPException", "detail": "Incorrect username or password", "body": "",
                             "errors": ""})
            make_channel(kind="sd-webui", base_url=up.url, api_key="webui:hunter22", models="sdxl")
            r = self.generate({"model": "sdxl", "prompt": "a castle"})
        assert_openai_error(r, 502, "server_error", "upstream_error")
        self.assertNotIn("hunter22", r.content.decode())

    def test_its_config_is_checked_when_a_channel_is_saved(self) -> None:
        adapter = SDWebUIAdapter()
        self.assertEqual(adapter.parse_config({"steps": 20}).steps, 20)
        for bad in ({"steps": 0}, {"steps": "many"}, {"cfg": 7}, {"default_size": "big"},
                    {"quality_steps": {"hd": 500}}):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                adapter.parse_config(bad)
        channel = make_channel(kind="sd-webui", base_url="http://127.0.0.1:7860", api_key="", models="sdxl")
        channel.config = {"steps": 0}
        with self.assertRaises(ValidationError) as caught:
            channel.full_clean()
        self.assertIn("config", caught.exception.message_dict)


class SDWebUIEditTests(ApiTestCase):
    def edit(self, path: str, fields: dict[str, object]) -> Any:
        return self.client.post(path, data=fields, headers={"Authorization": f"Bearer {self.key}"})

    def test_an_edit_goes_to_img2img_with_the_mask_converted_to_white_repaints(self) -> None:
        source = image_bytes(96, 72, color=(10, 200, 10))
        hole = (8, 4, 40, 20)
        with FakeUpstream() as up:
            up.respond(200, a1111_answer)
            make_channel(kind="sd-webui", base_url=up.url, api_key="", models="gpt-image-1.5",
                         config={"denoising_strength": 0.9, "mask_blur": 2})
            r = self.edit("/v1/images/edits", {
                "model": "gpt-image-1.5", "prompt": "a red door", "response_format": "b64_json",
                "image": SimpleUploadedFile("in.png", source, "image/png"),
                "mask": SimpleUploadedFile("mask.png", mask_png(96, 72, hole=hole), "image/png")})
        self.assertEqual(r.status_code, 200, r.content)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/sdapi/v1/img2img")
        body = sent.json()
        self.assertEqual(base64.b64decode(body["init_images"][0]), source)
        self.assertEqual((body["prompt"], body["width"], body["height"], body["batch_size"]), ("a red door", 96, 72, 1))
        self.assertEqual((body["denoising_strength"], body["mask_blur"], body["inpainting_mask_invert"]), (0.9, 2, 0))
        mask = Image.open(io.BytesIO(base64.b64decode(body["mask"])))
        self.assertEqual((mask.mode, mask.size), ("L", (96, 72)))
        left, top, right, bottom = hole
        for y in range(72):
            for x in range(96):
                repaint = left <= x < right and top <= y < bottom
                self.assertEqual(mask.getpixel((x, y)), 255 if repaint else 0, (x, y))

    def test_a_variation_is_img2img_without_a_prompt(self) -> None:
        source = image_bytes(96, 96)
        with FakeUpstream() as up:
            up.respond(200, a1111_answer)
            make_channel(kind="sd-webui", base_url=up.url, api_key="", models="sdxl")
            r = self.edit("/v1/images/variations", {"image": SimpleUploadedFile("in.png", source, "image/png"),
                                                    "model": "sdxl", "n": "2", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 2)
        body = up.requests[0].json()
        self.assertEqual((body["prompt"], body["batch_size"], body["width"]), ("", 2, 96))
        self.assertNotIn("mask", body)
        self.assertEqual(base64.b64decode(body["init_images"][0]), source)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_calls_txt2img_with_basic_auth_from_the_key_and_the_mapped_checkpoint() -> None:
    channel = target("sd-webui", base_url="http://webui:7860", api_key="user:secret",
                     model_map={"sdxl": "sd_xl_base_1.0.safetensors"})
    upstream = get_adapter("sd-webui").build_request(request(model="sdxl", size="512x768", n=2), channel)
    assert upstream.url == "http://webui:7860/sdapi/v1/txt2img" and upstream.auth == ("user", "secret")
    assert upstream.json is not None
    assert (upstream.json["width"], upstream.json["height"], upstream.json["batch_size"]) == (512, 768, 2)
    assert upstream.json["override_settings"] == {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors"}


def test_an_edit_calls_img2img_at_its_inputs_size() -> None:
    upstream = get_adapter("sd-webui").build_request(request("edits", model="sdxl", images=(png_input(100, 60),)),
                                                     target("sd-webui", api_key=""))
    assert upstream.url.endswith("/sdapi/v1/img2img") and upstream.auth is None
    assert upstream.json is not None and (upstream.json["width"], upstream.json["height"]) == (96, 64)


def test_it_reads_the_images_and_refuses_an_answer_without_them() -> None:
    adapter, req, channel = get_adapter("sd-webui"), request(model="sdxl"), target("sd-webui")
    result = adapter.parse_response(answer(200, {"images": ["aGk="]}), req, channel)
    assert isinstance(result, ImagesResponse) and [d.b64_json for d in result.data] == ["aGk="]
    try:
        adapter.parse_response(answer(200, {"detail": "x"}), req, channel)
    except UpstreamError as error:
        assert error.channel_fault
    else:
        raise AssertionError("an answer without images was accepted")
