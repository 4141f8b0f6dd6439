"""A hostile provider that echoes the credentials it was sent, in every field of its errors: none of it reaches a
client, a usage row, a channel's last error, the admin, the log or /metrics."""

from __future__ import annotations

import base64
import json
import logging
import re

from django.contrib.auth.models import User
from django.test import override_settings

from channels.models import Channel
from gateway.models import UsageLog
from tests.base import ApiTestCase
from tests.factories import make_channel
from tests.fake_upstream import FakeUpstream, echo_credentials

# Each channel type authenticates its own way: Bearer, Basic (a user:password pair), an api-key or x-goog-api-key
# header. Each key's every form (as is, the password alone, base64) must stay in.
CHANNELS = [
    ("openai", "sk-hostile-SECRET-0123456789", {}),
    ("sd-webui", "webui:pa55-w0rd-SECRET", {}),
    ("azure", "azure-SECRET-key-0123456789", {"config": {"api_version": "2024-02-01"},
                                                          "model_map": {"dall-e-3": "my-dalle3"}}),
    ("gemini", "AIzaSECRET-0123456789abcdef", {"model_map": {"dall-e-3": "imagen-4.0-generate-001"}}),
]


def forms(key: str) -> list[str]:
    password = key.partition(":")[2]
    return [key, base64.b64encode(key.encode()).decode(), *([password] if password else [])]


class HostileProviderTests(ApiTestCase):
    @override_settings(OPENOPEN8_BREAKER_THRESHOLD=100)
    def test_no_form_of_a_channel_key_echoed_by_the_provider_leaves_the_gateway(self) -> None:
        User.objects.create_superuser("root", "root@example.com", "pw")
        for kind, key, extra in CHANNELS:
            for status in (400, 401, 403, 500):
                with (self.subTest(kind=kind, status=status), FakeUpstream() as up,
                      self.assertLogs(level="INFO") as logs):
                    logging.getLogger("tests").info("start")  # assertLogs needs one line
                    Channel.objects.all().delete()
                    up.respond(200, echo_credentials(status))
                    base = up.url + ("/v1beta" if kind == "gemini" else "")
                    make_channel(kind=kind, base_url=base, api_key=key, models="dall-e-3", **extra)
                    r = self.generate({"model": "dall-e-3", "prompt": "a", "response_format": "b64_json"})
                    self.assertTrue(up.requests, "the provider was called")
                    self.assertGreaterEqual(r.status_code, 400)
                    self.client.force_login(User.objects.get())
                    row = UsageLog.objects.get(request_id=r["x-request-id"])
                    seen = {
                        "answer": r.content.decode(),
                        "usage row": json.dumps([row.error_code, row.error_message, row.error_type, row.attempts]),
                        "channel": json.dumps([c.last_error + c.disabled_reason + json.dumps(c.disabled_keys)
                                               for c in Channel.objects.all()]),
                        "admin": "".join(self.client.get(page).content.decode() for page in (
                            "/admin/gateway/usagelog/", f"/admin/gateway/usagelog/{row.pk}/change/",
                            "/admin/channels/channel/")),
                        "log": "\n".join(logs.output),
                        "metrics": self.client.get("/metrics").content.decode(),
                    }
                    self.client.logout()
                    for where, text in seen.items():
                        for form in forms(key):
                            self.assertFalse(form in text, f"{form} in the {where}")
                    self.assertNotIn(up.url.removeprefix("http://"), seen["answer"])

    def test_provider_error_codes_outside_the_known_set_count_as_other_in_metrics(self) -> None:
        with FakeUpstream() as up:
            up.respond(400, {"error": {"message": "x", "code": "quota_for_project_4711_exhausted"}})
            make_channel(base_url=up.url, models="dall-e-2", name="odd-codes")
            self.generate({"model": "dall-e-2", "prompt": "a"})
        text = self.client.get("/metrics").content.decode()
        # In no label: a sample's value (a timestamp's digits) may hold the same four digits by chance.
        self.assertFalse([labels for labels in re.findall(r"\{[^}]*\}", text) if "4711" in labels])
        self.assertIn('openopen8_provider_errors_total{channel="odd-codes",code="other"}', text)


class MetricsTokenTests(ApiTestCase):
    @override_settings(OPENOPEN8_METRICS_TOKEN="scrape-me-0123456789")
    def test_metrics_ask_for_the_bearer_token_when_one_is_set(self) -> None:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me-0123456789"}):
            r = self.client.get("/metrics", headers=headers)
            self.assertEqual(r.status_code, 401)
            self.assertEqual(r.json()["error"]["code"], "invalid_api_key")
        r = self.client.get("/metrics", headers={"Authorization": "Bearer scrape-me-0123456789"})
        self.assertEqual(r.status_code, 200)
        self.assertIn("openopen8_requests_total", r.content.decode())
