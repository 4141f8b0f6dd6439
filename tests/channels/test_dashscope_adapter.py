from __future__ import annotations

from typing import Any

from django.test import override_settings

from channels.adapters import get_adapter
from channels.adapters.base import Poll
from gateway.models import ApiToken, UsageLog
from openopen8.core.errors import ContentPolicyViolation, UpstreamKeyRejected
from openopen8.core.schemas import ImagesResponse
from tests.adapters import answer, request, target
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel, make_price, make_token, png_bytes
from tests.fake_upstream import FakeUpstream, Recorded

FAST = {"poll_interval": 0.02}


class TaskServer:
    """DashScope's asynchronous task API: submit, then the task runs for ``polls`` polls before it ends."""

    def __init__(self, up: FakeUpstream, *, polls: int = 2, end: dict[str, Any] | None = None) -> None:
        self.up, self.polls, self.end = up, polls, end
        self.image_url = up.serve_file("/results/1.png", png_bytes(6, 6))

    def __call__(self, request: Recorded) -> Any:
        if request.method == "POST":
            return {"request_id": "r1", "output": {"task_id": "t-1", "task_status": "PENDING"}}
        self.polls -= 1
        if self.polls > 0:
            return {"request_id": "r2", "output": {"task_id": "t-1", "task_status": "RUNNING"}}
        return self.end or {"request_id": "r3", "output": {"task_id": "t-1", "task_status": "SUCCEEDED", "results": [
            {"url": self.image_url}, {"url": self.image_url}]}, "usage": {"image_count": 2}}


class DashScopeAdapterTests(ApiTestCase):
    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)  # the fake's result URL stands in for DashScope's storage
    def test_it_submits_a_task_polls_it_and_delivers_the_results(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, TaskServer(up, polls=3))
            make_channel(kind="dashscope", base_url=up.url + "/api/v1", api_key="sk-ds-123456789", models="wan",
                         model_map={"wan": "wan2.2-t2i-flash"}, config=FAST)
            r = self.generate({"model": "wan", "prompt": "a bamboo forest", "n": 2, "size": "1792x1024",
                               "negative_prompt": "people", "seed": 5, "watermark": False,
                               "response_format": "b64_json"})
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(len(r.json()["data"]), 2)
        submit = up.requests[0]
        self.assertEqual((submit.path, submit.headers["X-DashScope-Async"], submit.headers["Authorization"]),
                         ("/api/v1/services/aigc/text2image/image-synthesis", "enable", "Bearer sk-ds-123456789"))
        self.assertEqual(submit.json(), {"model": "wan2.2-t2i-flash",
                                         "input": {"prompt": "a bamboo forest", "negative_prompt": "people"},
                                         "parameters": {"n": 2, "seed": 5, "watermark": False, "size": "1440*816"}})
        polls = [(q.method, q.path) for q in up.requests[1:] if q.path.startswith("/api/v1/tasks")]
        self.assertEqual(polls, [("GET", "/api/v1/tasks/t-1")] * 3)

    def test_a_task_that_outlives_the_deadline_is_abandoned_and_not_charged(self) -> None:
        make_price(model="wan", usd="0.03")
        token, key = make_token(name="payer", budget="1")
        with FakeUpstream() as up:
            up.respond(200, TaskServer(up, polls=10_000))
            make_channel(kind="dashscope", base_url=up.url, models="wan", timeout=0.4,
                         config={"poll_interval": 0.05})
            r = self.generate({"model": "wan", "prompt": "x"}, key=key)
        error = assert_openai_error(r, 504, "server_error", "upstream_timeout")
        self.assertIn("did not finish", error["message"])
        self.assertGreater(len(up.requests), 2)
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 0)
        self.assertEqual(UsageLog.objects.get().cost_micros, 0)

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_a_failed_moderation_is_a_refusal_and_other_failures_fail_over(self) -> None:
        refused = {"output": {"task_id": "t-1", "task_status": "FAILED", "code": "DataInspectionFailed",
                              "message": "Input data may contain inappropriate content."}}
        with FakeUpstream() as up:
            up.respond(200, TaskServer(up, polls=1, end=refused))
            make_channel(kind="dashscope", base_url=up.url, models="wan", config=FAST)
            assert_openai_error(self.generate({"model": "wan", "prompt": "x"}), 400, "invalid_request_error",
                                "content_policy_violation")
        broken = {"output": {"task_id": "t-1", "task_status": "FAILED", "code": "InternalError", "message": "oops"}}
        with FakeUpstream() as bad, FakeUpstream() as good:
            bad.respond(200, TaskServer(bad, polls=1, end=broken))
            good.respond(200, TaskServer(good, polls=1))
            make_channel(kind="dashscope", base_url=bad.url, models="wan2", config=FAST, priority=1)
            make_channel(kind="dashscope", base_url=good.url, models="wan2", config=FAST)
            self.assertEqual(self.generate({"model": "wan2", "prompt": "x"}).status_code, 200)

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True)
    def test_each_model_is_sent_sizes_and_n_its_reference_allows(self) -> None:
        qwen = {(1664, 928), (1472, 1140), (1328, 1328), (1140, 1472), (928, 1664)}

        def provider(request: Recorded) -> Any:
            """DashScope as Model Studio's references describe it: qwen-image takes five sizes and n = 1, wan2.5 a
            total area from 768*768 to 1440*1440, other Wan models sides from 512 to 1440 and n up to 4."""
            if request.method == "GET":
                return {"output": {"task_id": request.path.rsplit("/", 1)[1], "task_status": "SUCCEEDED",
                                   "results": [{"url": image}] * int(request.path.rsplit("-", 1)[1])}}
            body = request.json()
            model, n = body["model"], body["parameters"]["n"]
            width, height = map(int, body["parameters"]["size"].split("*"))
            allowed = {"qwen-image": (width, height) in qwen and n == 1,
                       "wan2.5-t2i-preview": 768 * 768 <= width * height <= 1440 * 1440 and 1 / 4 <= width / height <= 4
                       and n <= 4}.get(model, 512 <= min(width, height) and max(width, height) <= 1440 and n <= 4)
            if not allowed:
                return 400, {"request_id": "r", "code": "InvalidParameter", "message": f"size or n not supported: "
                                                                                       f"{width}*{height}, {n}"}
            return {"request_id": "r", "output": {"task_id": f"t-{n}", "task_status": "PENDING"}}

        cases = [("qwen-image", "1024x1024", 2, ["1328*1328"] * 2), ("qwen-image", "1792x1024", 1, ["1664*928"]),
                 ("qwen-image", "1024x1536", 1, ["1140*1472"]), ("wan2.5-t2i-preview", "512x512", 1, ["768*768"]),
                 ("wan2.5-t2i-preview", "1024x512", 1, ["1088*544"]),
                 ("wan2.5-t2i-preview", "4096x1024", 5, ["2880*720", "2880*720"]),
                 ("wan2.2-t2i-plus", "512x512", 3, ["512*512"])]
        with FakeUpstream() as up:
            image = up.serve_file("/results/1.png", png_bytes(6, 6))
            up.respond(200, provider)
            for model, size, n, expected in cases:
                make_channel(kind="dashscope", base_url=up.url, models=model, config=FAST)
                up.requests.clear()
                r = self.generate({"model": model, "prompt": "a poster", "size": size, "n": n})
                self.assertEqual((r.status_code, len(r.json().get("data", []))), (200, n), r.content)
                submitted = [q.json()["parameters"] for q in up.requests if q.method == "POST"]
                self.assertEqual(sorted(p["size"] for p in submitted), expected)
                self.assertEqual(sum(p["n"] for p in submitted), n)

    def test_an_invalid_key_is_a_channel_fault(self) -> None:
        with FakeUpstream() as up:
            up.respond(401, {"request_id": "r", "code": "InvalidApiKey", "message": "Invalid API-key provided."})
            channel = make_channel(kind="dashscope", base_url=up.url, models="wan", config=FAST)
            assert_openai_error(self.generate({"model": "wan", "prompt": "x"}), 502, "server_error", "upstream_error")
        channel.refresh_from_db()
        self.assertFalse(channel.enabled)


# Database-free: the adapter's methods on plain values, as the admin and dispatcher hand them over.
def test_it_starts_an_asynchronous_task_with_a_size_scaled_into_range() -> None:
    upstream = get_adapter("dashscope").build_request(request(model="wan2.2-t2i-flash", size="2048x1024", n=2),
                                                      target("dashscope", base_url="https://dashscope.example/api/v1"))
    assert upstream.url == "https://dashscope.example/api/v1/services/aigc/text2image/image-synthesis"
    assert upstream.headers["X-DashScope-Async"] == "enable"
    assert upstream.json is not None
    assert upstream.json["parameters"] == {"n": 2, "size": "1440*720"}


def test_a_running_task_is_polled_and_a_finished_one_read() -> None:
    adapter, req, channel = get_adapter("dashscope"), request(model="wan2.2-t2i-flash"), target("dashscope")
    running = adapter.parse_response(answer(200, {"output": {"task_id": "t1", "task_status": "RUNNING"}}), req,
                                     channel)
    assert isinstance(running, Poll) and running.request.url == "https://provider.example/v1/tasks/t1"
    done = adapter.parse_response(answer(200, {"output": {"task_id": "t1", "task_status": "SUCCEEDED",
                                                          "results": [{"url": "https://oss/1.png"}]}}), req, channel)
    assert isinstance(done, ImagesResponse) and [d.url for d in done.data] == ["https://oss/1.png"]


def test_inspection_failures_are_refusals_and_a_bad_key_the_channels_fault() -> None:
    adapter, req, channel = get_adapter("dashscope"), request(model="wan2.2-t2i-flash"), target("dashscope")
    try:
        adapter.parse_response(answer(200, {"output": {"task_id": "t1", "task_status": "FAILED",
                                                       "code": "DataInspectionFailed"}}), req, channel)
    except ContentPolicyViolation:
        pass
    else:
        raise AssertionError("a refused task was not a refusal")
    assert isinstance(adapter.parse_error(answer(401, {"code": "InvalidApiKey", "message": "bad"}), channel),
                      UpstreamKeyRejected)
