from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

from django.test import override_settings

from gateway.models import ApiToken, UsageLog
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel, make_token

ROOT = Path(__file__).resolve().parents[2]


@override_settings(DEBUG=False)
class ErrorHandlingTests(ApiTestCase):
    def test_unknown_paths_get_openai_shaped_404s(self) -> None:
        for path in ("/v1/unknown", "/v1/images/generations/extra", "/nowhere"):
            with self.subTest(path=path):
                error = assert_openai_error(self.client.get(path), 404, "invalid_request_error")
                self.assertIn(path, error["message"])

    def test_answers_are_json_whatever_the_accept_header_or_a_format_parameter_asks(self) -> None:
        # As OpenAI's API: a browser's or an HTTP library's Accept header, or ?format=, does not change the answer.
        make_channel(kind="placeholder", models="dall-e-2")
        headers = {"Authorization": f"Bearer {self.key}"}
        for accept in ("text/html", "image/png", "application/xml"):
            with self.subTest(accept=accept):
                r = self.client.get("/v1/models", headers={**headers, "Accept": accept})
                self.assertEqual((r.status_code, r["Content-Type"]), (200, "application/json"))
                r = self.client.post("/v1/images/generations?format=xml", content_type="application/json",
                                     data={"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"},
                                     headers={**headers, "Accept": accept})
                self.assertEqual((r.status_code, r["Content-Type"]), (200, "application/json"))
                self.assertIn("b64_json", r.json()["data"][0])
        error = assert_openai_error(self.client.get("/v1/nowhere", headers={"Accept": "text/html"}), 404,
                                    "invalid_request_error")
        self.assertIn("/v1/nowhere", error["message"])

    def test_a_request_for_an_unknown_host_gets_a_json_400(self) -> None:
        with override_settings(ALLOWED_HOSTS=["images.example.com"]):
            r = self.generate({"model": "dall-e-2", "prompt": "a"})
        assert_openai_error(r, 400, "invalid_request_error")

    def test_the_admins_static_files_are_served_with_debug_off(self) -> None:
        r = self.client.get("/static/admin/css/base.css")
        self.assertEqual(r.status_code, 200)
        self.assertIn("text/css", r["Content-Type"])

    def test_an_unexpected_failure_is_a_json_500_logged_and_refunded(self) -> None:
        token, key = make_token(name="b", budget="1")
        make_channel(kind="placeholder")
        with mock.patch("gateway.routing.images_deliver", autospec=True, side_effect=RuntimeError("disk on fire")):
            r = self.generate({"model": "dall-e-3", "prompt": "a"}, key=key)
        error = assert_openai_error(r, 500, "server_error")
        self.assertNotIn("disk on fire", error["message"])
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 0)
        log = UsageLog.objects.get()
        self.assertEqual((log.status, log.http_status, log.reserved_micros), ("error", 500, 0))


def settings_process(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENOPEN8_")}
    return subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, text=True,
                          capture_output=True, env={**clean, "DJANGO_SETTINGS_MODULE": "openopen8.settings", **env})


def test_with_debug_off_it_refuses_to_start_on_the_development_secret_key(tmp_path: Path) -> None:
    refused = settings_process(OPENOPEN8_DEBUG="false", OPENOPEN8_DATA_DIR=str(tmp_path))
    assert refused.returncode != 0
    assert "OPENOPEN8_SECRET_KEY" in refused.stderr
    secret = tmp_path / "secret"
    secret.write_text("a-long-random-production-secret-value\n")
    assert settings_process(OPENOPEN8_DEBUG="false", OPENOPEN8_DATA_DIR=str(tmp_path),
                            OPENOPEN8_SECRET_KEY_FILE=str(secret)).returncode == 0


def test_bad_setting_values_are_refused_by_name(tmp_path: Path) -> None:
    bad = (("OPENOPEN8_MAX_ATTEMPTS", "lots"), ("OPENOPEN8_IMAGE_TTL", "-5"), ("OPENOPEN8_DEBUG", "maybe"))
    for name, value in bad:
        result = settings_process(**{name: value, "OPENOPEN8_DATA_DIR": str(tmp_path)})
        assert result.returncode != 0 and name in result.stderr, (name, result.stderr[-300:])


class OversizedInputTests(ApiTestCase):
    """What Django refuses while reading a body is the client's 4xx, never a 500."""

    def multipart(self, fields: dict[str, str], files: int = 0) -> object:
        from django.core.files.uploadedfile import SimpleUploadedFile

        data: dict[str, object] = dict(fields)
        for i in range(files):
            data[f"image{i}"] = SimpleUploadedFile(f"{i}.png", b"x", content_type="image/png")
        return self.client.post("/v1/images/edits", data=data, headers={"Authorization": f"Bearer {self.key}"})

    def test_too_many_fields_or_files_are_a_400(self) -> None:
        many = {f"f{i}": "x" for i in range(1500)} | {"prompt": "a", "model": "dall-e-2"}
        self.assertIn("form fields", assert_openai_error(self.multipart(many), 400, "invalid_request_error")["message"])
        r = self.multipart({"prompt": "a", "model": "dall-e-2"}, files=150)
        self.assertIn("files", assert_openai_error(r, 400, "invalid_request_error")["message"])

    @override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
    def test_text_fields_over_the_size_limit_are_a_413(self) -> None:
        r = self.multipart({"prompt": "a" * 2000, "model": "dall-e-2"})
        assert_openai_error(r, 413, "invalid_request_error", "request_too_large")

    def test_a_json_body_of_tens_of_megabytes_within_the_limit_is_checked_like_any_other(self) -> None:
        make_channel(kind="placeholder", models="dall-e-2")
        r = self.generate({"model": "dall-e-2", "prompt": "a" * (30 * 1024 * 1024)})
        assert_openai_error(r, 400, "invalid_request_error", "string_above_max_length", "prompt")
