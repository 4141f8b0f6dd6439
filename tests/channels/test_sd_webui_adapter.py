from __future__ import annotations

import base64
import json

from django.core.exceptions import ValidationError

from channels.adapters.sd_webui import SDWebUIAdapter
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel, png_b64, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded


def a1111_answer(request: Recorded, *, grid: bool = False) -> dict[str, object]:
    """What the web UI answers for txt2img: batch_size images, a grid first when asked, info as a JSON string."""
    asked = request.json()["batch_size"] * request.json()["n_iter"]
    images = [png_b64(4 + i, 4) for i in range(asked)]
    first = 0
    if grid:
        images.insert(0, png_b64(99, 99))
        first = 1
    return {"images": images, "parameters": request.json(), "info": json.dumps({"index_of_first_image": first})}


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
