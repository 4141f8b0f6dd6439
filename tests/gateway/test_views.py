"""The HTTP views themselves: health and readiness, and answers freed as soon as they are sent."""

from __future__ import annotations

import gc
import json
from typing import Any

from django.core import signals
from django.core.handlers.wsgi import WSGIHandler
from django.db import close_old_connections
from django.http import HttpResponseBase
from django.test import Client, RequestFactory, TestCase, override_settings

from tests.base import ApiTestCase
from tests.factories import make_channel, openai_images
from tests.fake_upstream import FakeUpstream


class AnswerMemoryTests(ApiTestCase):
    """An answer (megabytes of base64 for a large image) is freed as soon as it is sent. Left in a reference cycle it
    waited for the cyclic garbage collector, and a worker serving large images grew (bench/RESULTS.md)."""

    def call(self, body: dict[str, Any]) -> tuple[str, list[HttpResponseBase]]:
        environ = RequestFactory().post("/v1/images/generations", json.dumps(body), content_type="application/json",
                                        headers={"Authorization": f"Bearer {self.key}"}).environ
        status: list[str] = []

        def start_response(line: str, headers: Any, exc_info: Any = None) -> Any:
            status.append(line)
        # As Django's test client does: the test's database connection (and its transaction) must stay open.
        signals.request_started.disconnect(close_old_connections)
        signals.request_finished.disconnect(close_old_connections)
        gc.collect()
        gc.disable()
        try:
            answer = WSGIHandler()(environ, start_response)
            b"".join(answer)
            answer.close()  # what the server does once the body is sent
            del answer
            gc.set_debug(gc.DEBUG_SAVEALL)  # keep what only the cyclic collector would have freed, to look at it
            gc.collect()
            stranded = [o for o in gc.garbage if isinstance(o, HttpResponseBase)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
            signals.request_started.connect(close_old_connections)
            signals.request_finished.connect(close_old_connections)
        return status[0], stranded

    def test_answers_are_freed_once_sent(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url)
            status, stranded = self.call({"model": "dall-e-2", "prompt": "a", "n": 2, "response_format": "b64_json"})
        self.assertEqual(status, "200 OK")
        self.assertEqual(stranded, [])

    def test_error_answers_are_freed_once_sent(self) -> None:
        status, stranded = self.call({"model": "dall-e-2", "prompt": ""})
        self.assertTrue(status.startswith("400"), status)
        self.assertEqual(stranded, [])


class HealthTests(TestCase):
    def test_healthz_and_readyz_answer_without_a_key(self) -> None:
        self.assertEqual(self.client.get("/healthz").json(), {"status": "ok"})
        ready = self.client.get("/readyz")
        self.assertEqual(ready.status_code, 200)
        self.assertEqual(ready.json()["checks"]["database"], "ok")

    @override_settings(REDIS_URL="redis://127.0.0.1:1/0")
    def test_readyz_is_503_when_redis_is_configured_but_down(self) -> None:
        ready = self.client.get("/readyz")
        self.assertEqual(ready.status_code, 503)
        self.assertTrue(ready.json()["checks"]["redis"].startswith("error"))


class ApiSurfaceTests(TestCase):
    def test_every_path_of_the_api_surface_answers_json_for_every_method_even_with_csrf_checks(self) -> None:
        client = Client(enforce_csrf_checks=True)
        paths = ["/v1/foo", "/v1/chat/completions", "/v1/images/files/abc.png", "/v1/images/generations",
                 "/v1/images/edits", "/v1/images/variations", "/v1/models", "/v1/", "/healthz", "/readyz", "/metrics"]
        for path in paths:
            for method in ("get", "post", "put", "patch", "delete", "options"):
                with self.subTest(path=path, method=method):
                    r = (client.get(path) if method == "get" else
                         getattr(client, method)(path, data=b"{}", content_type="application/json"))
                    self.assertTrue(r["Content-Type"].startswith(("application/json", "text/plain")), r["Content-Type"])
                    if r.status_code >= 400:
                        self.assertEqual(set(r.json()["error"]), {"message", "type", "param", "code"})
                    if method != "get" and path in ("/healthz", "/readyz", "/metrics", "/v1/images/files/abc.png"):
                        self.assertEqual(r.status_code, 405)


class UnicodeDigitTests(ApiTestCase):
    """Characters that str.isdigit() takes for digits but int() refuses (a superscript three) are bad input, never a
    500: schemathesis found `limit=³`."""

    def test_superscript_digits_are_refused_as_bad_input(self) -> None:
        make_channel(kind="placeholder", models="*")
        auth = {"Authorization": f"Bearer {self.key}"}
        self.assertEqual(self.client.get("/v1/images/jobs?limit=³", headers=auth).status_code, 400)
        for body in ({"model": "some-model", "prompt": "a", "size": "³x³"},
                     {"model": "dall-e-2", "prompt": "a", "size": "²⁵⁶x²⁵⁶"}):
            r = self.generate(body)
            self.assertEqual((r.status_code, r.json()["error"]["param"]), (400, "size"))
        r = self.client.post("/v1/images/edits", {"model": "gpt-image-1.5", "prompt": "a", "n": "³",
                                                  "image": _png_upload()}, headers=auth)
        self.assertEqual(r.status_code, 400)


def _png_upload() -> Any:
    from django.core.files.uploadedfile import SimpleUploadedFile

    from tests.factories import png_bytes

    return SimpleUploadedFile("a.png", png_bytes(16, 16), "image/png")
