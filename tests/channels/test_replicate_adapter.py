from __future__ import annotations

import base64
import io
from typing import Any

from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import override_settings
from PIL import Image

from channels.adapters import get_adapter
from channels.adapters.base import Poll
from openopen8.core.errors import ContentPolicyViolation
from openopen8.core.schemas import ImagesResponse
from tests.adapters import KEY, answer, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import image_bytes, make_channel, mask_png, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded

CONFIG = {"inputs": {"prompt": "prompt", "n": "num_outputs", "seed": "seed"}, "max_outputs": 4,
          "static_input": {"output_format": "png"}, "poll_interval": 0.02}


class Predictions:
    """Replicate's predictions API: ``Prefer: wait`` answers at once when ``ready``, else after ``polls`` polls."""

    def __init__(self, up: FakeUpstream, *, ready: bool, polls: int = 2, final: dict[str, Any] | None = None) -> None:
        self.up, self.ready, self.polls, self.final = up, ready, polls, final
        self.outputs = [up.serve_file(f"/files/out-{i}.png", png_bytes(3 + i, 3)) for i in range(4)]

    def done(self, n: int) -> dict[str, Any]:
        return self.final or {"id": "p1", "status": "succeeded", "output": self.outputs[:n]}

    def __call__(self, request: Recorded) -> Any:
        if request.method == "POST":
            self.n = request.json()["input"].get("num_outputs", 1)
            if self.ready:
                return 201, self.done(self.n)
            return 201, {"id": "p1", "status": "starting", "urls": {"get": f"{self.up.url}/v1/predictions/p1"}}
        self.polls -= 1
        return {"id": "p1", "status": "processing"} if self.polls > 0 else self.done(self.n)


@override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)  # the fake's output URLs stand in for Replicate's file host
class ReplicateAdapterTests(ApiTestCase):
    def test_it_waits_for_a_prediction_with_the_models_own_inputs(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, Predictions(up, ready=True))
            make_channel(kind="replicate", base_url=up.url + "/v1", api_key="r8_key_123456789", models="flux",
                         model_map={"flux": "black-forest-labs/flux-schnell"}, config=CONFIG)
            r = self.generate({"model": "flux", "prompt": "a lighthouse", "n": 3, "size": "1792x1024", "seed": 3,
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 3)
        sent = up.requests[0]
        self.assertEqual(sent.path, "/v1/models/black-forest-labs/flux-schnell/predictions")
        self.assertEqual((sent.headers["Authorization"], sent.headers["Prefer"]),
                         ("Bearer r8_key_123456789", "wait=60"))
        self.assertEqual(sent.json(), {"input": {"output_format": "png", "prompt": "a lighthouse", "num_outputs": 3,
                                                 "seed": 3, "aspect_ratio": "16:9"}})

    def test_it_polls_a_prediction_that_is_not_done_and_versions_go_to_predictions(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, Predictions(up, ready=False, polls=3))
            make_channel(kind="replicate", base_url=up.url + "/v1", models="sdxl",
                         model_map={"sdxl": "stability-ai/sdxl:39ed52f2"}, config=CONFIG)
            r = self.generate({"model": "sdxl", "prompt": "a lighthouse"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual((up.requests[0].path, up.requests[0].json()["version"]), ("/v1/predictions", "39ed52f2"))
        polls = [q.path for q in up.requests if q.method == "GET" and "predictions" in q.path]
        self.assertEqual(polls, ["/v1/predictions/p1"] * 3)

    def test_a_safety_failure_is_a_refusal_and_a_prediction_outliving_the_deadline_is_abandoned(self) -> None:
        nsfw = {"id": "p1", "status": "failed", "error": "NSFW content detected. Try running it again."}
        with FakeUpstream() as up:
            up.respond(200, Predictions(up, ready=True, final=nsfw))
            make_channel(kind="replicate", base_url=up.url, models="flux", config=CONFIG)
            assert_openai_error(self.generate({"model": "flux", "prompt": "x"}), 400, "invalid_request_error",
                                "content_policy_violation")
        with FakeUpstream() as up:
            up.respond(200, Predictions(up, ready=False, polls=10_000))
            make_channel(kind="replicate", base_url=up.url, models="slow", config=CONFIG, timeout=0.3)
            assert_openai_error(self.generate({"model": "slow", "prompt": "x"}), 504, "server_error",
                                "upstream_timeout")

    def test_an_inpaint_mask_is_sent_as_the_model_reads_it(self) -> None:
        # FLUX Fill: "Black areas will be preserved while white areas will be inpainted"; OpenAI: transparent = edit.
        hole, openai_mask = (2, 2, 6, 6), mask_png(8, 8, hole=(2, 2, 6, 6))
        fill = {"inputs": {"prompt": "prompt", "image": "image", "mask": "mask"}, "size_as": None}
        sent = {}
        for mask_as in (None, "black", "alpha"):
            with self.subTest(mask_as=mask_as), FakeUpstream() as up:
                up.respond(200, Predictions(up, ready=True))
                config = fill if mask_as is None else {**fill, "mask_as": mask_as}
                make_channel(kind="replicate", base_url=up.url, models=f"fill-{mask_as}", config=config,
                             model_map={f"fill-{mask_as}": "black-forest-labs/flux-fill-pro"})
                r = self.client.post("/v1/images/edits", {
                    "model": f"fill-{mask_as}", "prompt": "a boat",
                    "image": SimpleUploadedFile("a.png", image_bytes(8, 8)),
                    "mask": SimpleUploadedFile("m.png", openai_mask)}, headers={"Authorization": f"Bearer {self.key}"})
                self.assertEqual(r.status_code, 200, r.content)
                model_input = up.requests[0].json()["input"]
                self.assertEqual(base64.b64decode(model_input["image"].split(",", 1)[1]), image_bytes(8, 8))
                sent[mask_as] = base64.b64decode(model_input["mask"].removeprefix("data:image/png;base64,"))
        white = Image.open(io.BytesIO(sent[None]))
        self.assertEqual((white.mode, white.size), ("L", (8, 8)))
        inside, outside = (hole[0] + 1, hole[1] + 1), (0, 0)
        self.assertEqual((white.getpixel(inside), white.getpixel(outside), white.getpixel((7, 7))), (255, 0, 0))
        black = Image.open(io.BytesIO(sent["black"]))
        self.assertEqual((black.getpixel(inside), black.getpixel(outside)), (0, 255))
        self.assertEqual(sent["alpha"], openai_mask)

    def test_invalid_input_is_the_clients_and_a_model_the_account_cannot_run_the_channels(self) -> None:
        # Replicate's errors: {"title", "detail", "status"} (422 for both, told apart by the title).
        with FakeUpstream() as up, FakeUpstream() as other:
            up.respond(422, {"title": "Input validation failed", "status": 422, "detail": "- seed: Invalid type.",
                             "invalid_fields": [{"type": "invalid_type", "field": "seed"}]})
            make_channel(kind="replicate", base_url=up.url, models="flux", config=CONFIG)
            error = assert_openai_error(self.generate({"model": "flux", "prompt": "x"}), 400, "invalid_request_error")
            self.assertIn("seed: Invalid type", error["message"])
            up.respond(422, {"title": "Invalid version or not permitted", "status": 422,
                             "detail": "The specified version does not exist (or perhaps you don't have permission "
                                       "to use it?)"})
            other.respond(200, Predictions(other, ready=True))
            make_channel(kind="replicate", base_url=up.url, models="flux2", config=CONFIG, priority=5)
            make_channel(kind="replicate", base_url=other.url, models="flux2", config=CONFIG)
            self.assertEqual(self.generate({"model": "flux2", "prompt": "x"}).status_code, 200)
        self.assertEqual([r.method for r in other.requests].count("POST"), 1)

    def test_its_config_is_checked(self) -> None:
        from channels.adapters.replicate import ReplicateAdapter

        for bad in ({"inputs": {"n": "num_outputs"}}, {"inputs": {"prompt": "p", "colour": "c"}}, {"wait": 90},
                    {"size_as": "pixels"}, {"mask_as": "grey"}):
            with self.subTest(bad=bad), self.assertRaises(ValueError):
                ReplicateAdapter.parse_config(bad)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_maps_the_inputs_and_asks_to_wait() -> None:
    channel = target("replicate", base_url="https://api.replicate.com/v1",
                     config={"inputs": {"prompt": "prompt", "n": "num_outputs"}, "size_as": "aspect_ratio"})
    upstream = get_adapter("replicate").build_request(request(model="black-forest-labs/flux-schnell", n=2,
                                                              size="1024x1024"), channel)
    assert upstream.url == "https://api.replicate.com/v1/models/black-forest-labs/flux-schnell/predictions"
    assert upstream.headers["Authorization"] == f"Bearer {KEY}" and upstream.headers["Prefer"].startswith("wait=")
    assert upstream.json == {"input": {"prompt": "a red fox", "num_outputs": 2, "aspect_ratio": "1:1"}}


def test_a_prediction_in_progress_is_polled_and_a_finished_one_read() -> None:
    adapter, req, channel = get_adapter("replicate"), request(model="owner/model"), target("replicate")
    running = adapter.parse_response(answer(200, {"id": "p1", "status": "processing",
                                                  "urls": {"get": "https://api.example/p/p1"}}), req, channel)
    assert isinstance(running, Poll) and running.request.url == "https://api.example/p/p1"
    done = adapter.parse_response(answer(200, {"id": "p1", "status": "succeeded", "output": ["https://r/1.webp"]}),
                                  req, channel)
    assert isinstance(done, ImagesResponse) and [d.url for d in done.data] == ["https://r/1.webp"]


def test_a_safety_failure_is_a_refusal() -> None:
    try:
        get_adapter("replicate").parse_response(answer(200, {"status": "failed", "error": "NSFW content detected"}),
                                                request(model="owner/model"), target("replicate"))
    except ContentPolicyViolation:
        pass
    else:
        raise AssertionError("a flagged prediction was not a refusal")
