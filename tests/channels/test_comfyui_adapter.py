from __future__ import annotations

import io
import json
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image

from channels.adapters import get_adapter
from channels.adapters.base import Poll
from channels.adapters.comfyui import ComfyUIAdapter
from openopen8.core.errors import UpstreamError
from openopen8.core.schemas import ImagesResponse
from tests.adapters import answer, request, target
from tests.base import ApiTestCase
from tests.factories import image_bytes, make_channel, mask_png, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded

WORKFLOW = {
    "3": {"class_type": "KSampler", "inputs": {"seed": "{{seed}}", "steps": 20, "model": ["4", 0],
                                               "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": "{{width}}", "height": "{{height}}",
                                                       "batch_size": "{{batch_size}}"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, {{negative_prompt}}", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "oo8", "images": ["8", 0]}},
}
EDIT_WORKFLOW = {
    "10": {"class_type": "LoadImage", "inputs": {"image": "{{image}}"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "{{prompt}}"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["10", 0]}},
}


class ComfyServer:
    """ComfyUI's queue: /prompt, /history/<id> (empty until done), /view, /upload/image."""

    def __init__(self, up: FakeUpstream, *, runs: int = 2) -> None:
        self.up, self.runs = up, runs
        self.queued: list[dict[str, Any]] = []
        for i in range(3):
            up.serve_file(f"/view?filename=oo8_{i:05d}_.png&subfolder=&type=output", png_bytes(7 + i, 7))

    def __call__(self, request: Recorded) -> Any:
        if request.path == "/upload/image":
            return {"name": "uploaded-in.png", "subfolder": "", "type": "input"}
        if request.path == "/prompt":
            self.queued.append(request.json()["prompt"])
            return {"prompt_id": "abc", "number": 1, "node_errors": {}}
        self.runs -= 1
        if self.runs > 0:
            return {}
        batch = self.queued[-1].get("5", {}).get("inputs", {}).get("batch_size", 1)
        images = [{"filename": f"oo8_{i:05d}_.png", "subfolder": "", "type": "output"} for i in range(batch)]
        return {"abc": {"outputs": {"9": {"images": images}}, "status": {"status_str": "success", "completed": True}}}


class ComfyUIAdapterTests(ApiTestCase):
    def test_it_fills_the_workflow_queues_it_waits_and_fetches_the_outputs(self) -> None:
        with FakeUpstream() as up:
            server = ComfyServer(up, runs=3)
            up.respond(200, server)
            make_channel(kind="comfyui", base_url=up.url, api_key="", models="sdxl",
                         config={"workflow": WORKFLOW, "poll_interval": 0.02})
            r = self.generate({"model": "sdxl", "prompt": "a red barn", "n": 2, "size": "1536x1024", "seed": 99,
                               "negative_prompt": "rain", "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        graph = server.queued[0]
        self.assertEqual(graph["5"]["inputs"], {"width": 1536, "height": 1024, "batch_size": 2})
        self.assertEqual((graph["3"]["inputs"]["seed"], graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"]),
                         (99, "a red barn", "blurry, rain"))
        paths = [q.path for q in up.requests]
        self.assertEqual(paths[:4], ["/prompt", "/history/abc", "/history/abc", "/history/abc"])
        self.assertIn("/view?filename=oo8_00001_.png&subfolder=&type=output", paths)
        self.assertEqual(len(r.json()["data"]), 2)

    def test_an_edit_uploads_the_image_with_the_mask_as_alpha_first(self) -> None:
        with FakeUpstream() as up:
            server = ComfyServer(up, runs=1)
            up.respond(200, server)
            make_channel(kind="comfyui", base_url=up.url, api_key="", models="sdxl",
                         config={"workflow": EDIT_WORKFLOW, "poll_interval": 0.02})
            r = self.client.post("/v1/images/edits", {
                "model": "sdxl", "prompt": "a door", "image": SimpleUploadedFile("a.png", image_bytes(8, 8)),
                "mask": SimpleUploadedFile("m.png", mask_png(8, 8, hole=(0, 0, 4, 4)))},
                headers={"Authorization": f"Bearer {self.key}"})
        self.assertEqual(r.status_code, 200, r.content)
        upload = up.requests[0]
        self.assertEqual(upload.path, "/upload/image")
        uploaded = Image.open(io.BytesIO(upload.form()[1][0].data))
        self.assertEqual(uploaded.mode, "RGBA")
        self.assertEqual((uploaded.getchannel("A").getpixel((1, 1)), uploaded.getchannel("A").getpixel((6, 6))),
                         (0, 255))
        self.assertEqual(server.queued[0]["10"]["inputs"]["image"], "uploaded-in.png")

    def test_a_workflow_without_batch_size_runs_once_per_image_and_the_config_is_checked(self) -> None:
        single = json.loads(json.dumps(WORKFLOW).replace('"{{batch_size}}"', "1"))
        with FakeUpstream() as up:
            server = ComfyServer(up, runs=1)
            up.respond(200, server)
            make_channel(kind="comfyui", base_url=up.url, api_key="", models="sdxl",
                         config={"workflow": single, "poll_interval": 0.02})
            r = self.generate({"model": "sdxl", "prompt": "x", "n": 2})
        self.assertEqual(len(r.json()["data"]), 2)
        self.assertEqual(len(server.queued), 2)
        bad_configs: list[dict[str, Any]] = [{"workflow": {"1": {"inputs": {}}}},
                                             {"workflow": {"1": {"class_type": "X", "inputs": {}}}}]
        for bad in bad_configs:
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ComfyUIAdapter.parse_config(bad)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"text": "{{prompt}}", "width": "{{width}}",
                                                   "height": "{{height}}"}}}


def test_it_queues_the_workflow_with_the_prompt_and_size_filled_in() -> None:
    upstream = get_adapter("comfyui").build_request(request(model="sdxl", size="512x768"),
                                                    target("comfyui", base_url="http://comfy:8188",
                                                           config={"workflow": GRAPH}))
    assert upstream.url == "http://comfy:8188/prompt"
    assert upstream.json is not None
    assert upstream.json["prompt"]["3"]["inputs"] == {"text": "a red fox", "width": 512, "height": 768}


def test_a_queued_prompt_is_polled_in_the_history_until_its_images_are_there() -> None:
    adapter, req = get_adapter("comfyui"), request(model="sdxl")
    channel = target("comfyui", base_url="http://comfy:8188", config={"workflow": GRAPH})
    queued = adapter.parse_response(answer(200, {"prompt_id": "p1", "node_errors": {}}), req, channel)
    assert isinstance(queued, Poll) and queued.request.url == "http://comfy:8188/history/p1"
    history = {"p1": {"status": {"status_str": "success", "completed": True},
                      "outputs": {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]}}}}
    done = adapter.parse_response(answer(200, history, url="http://comfy:8188/history/p1"), req, channel)
    assert isinstance(done, ImagesResponse)
    assert [d.url for d in done.data] == ["http://comfy:8188/view?filename=a.png&subfolder=&type=output"]
    try:
        adapter.parse_response(answer(200, {"p1": {"status": {"status_str": "error"}}}), req, channel)
    except UpstreamError as error:
        assert error.channel_fault
    else:
        raise AssertionError("a failed workflow was not the channel's fault")
