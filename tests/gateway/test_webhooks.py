"""Job webhooks (gateway/webhooks.py): a finished job POSTed to its callback URL, signed as Standard Webhooks say,
verified here with the `standardwebhooks` package and with the openai SDK's own webhook helper."""

from __future__ import annotations

import time
from typing import Any

import openai
import requests
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.test import override_settings
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from gateway.models import ApiToken, ImageJob, WebhookDelivery
from gateway.webhooks import signature, webhook_secret_new
from tests.base import eventually
from tests.factories import make_channel, png_b64
from tests.fake_upstream import FakeUpstream
from tests.gateway.test_jobs import ASYNC, JobTestCase


@override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=True, OPENOPEN8_WEBHOOK_RETRIES=[0.3, 0.3])
class WebhookTests(JobTestCase):
    def submit_with_callback(self, callback_url: str, **fields: Any) -> requests.Response:
        return requests.post(f"{self.live_server_url}/v1/images/generations", headers={**self.auth, **ASYNC},
                             timeout=10, json={"model": "dall-e-2", "prompt": "a lighthouse",
                                               "response_format": "b64_json", "callback_url": callback_url,
                                               **fields})

    def test_a_finished_job_is_posted_signed_and_retried_until_the_receiver_takes_it(self) -> None:
        self.start_runner()
        with FakeUpstream() as provider, FakeUpstream() as receiver:
            provider.respond(200, {"created": 1, "data": [{"b64_json": png_b64(9, 9)}]})
            receiver.queue(500, {"error": "not now"})
            receiver.respond(204, b"")
            make_channel(base_url=provider.url)
            job_id = self.submit_with_callback(f"{receiver.url}/hooks/images").json()["id"]
            eventually(lambda: len(receiver.requests) == 2, within=15)
        self.assertNotIn("callback_url", provider.requests[0].json())  # the gateway's field, not the provider's
        secret = ApiToken.objects.get(pk=self.token.pk).webhook_secret
        self.assertTrue(secret.startswith("whsec_"))
        sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9")
        for delivery in receiver.requests:
            self.assertEqual(delivery.path, "/hooks/images")
            job = Webhook(secret).verify(delivery.body, delivery.headers)
            sdk.webhooks.verify_signature(delivery.body, delivery.headers, secret=secret)
            self.assertEqual((job["id"], job["status"]), (job_id, "succeeded"))
            self.assertEqual(job["result"]["data"][0]["b64_json"], png_b64(9, 9))
        ids = {d.headers["webhook-id"] for d in receiver.requests}
        self.assertEqual(len(ids), 1)  # one message, tried twice
        tries = list(WebhookDelivery.objects.filter(job_id=job_id).order_by("attempt"))
        self.assertEqual([(t.attempt, t.status_code, t.delivered) for t in tries], [(1, 500, False), (2, 204, True)])

    def test_an_operator_delivers_a_jobs_webhook_again_from_the_admin(self) -> None:
        self.start_runner()
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        with FakeUpstream() as receiver:
            receiver.respond(200, b"")
            make_channel(kind="placeholder")
            job_id = self.submit_with_callback(f"{receiver.url}/h").json()["id"]
            eventually(lambda: len(receiver.requests) == 1)
            self.client.post("/admin/gateway/imagejob/", {"action": "redeliver", "_selected_action": [job_id]})
            eventually(lambda: len(receiver.requests) == 2)
            page = self.client.get(f"/admin/gateway/imagejob/{quote(job_id)}/change/").content.decode()
        self.assertEqual(WebhookDelivery.objects.filter(job_id=job_id, delivered=True).count(), 2)
        self.assertIn("delivered", page)

    def test_only_the_body_signed_with_the_keys_secret_verifies(self) -> None:
        secret, now = webhook_secret_new(), int(time.time())
        headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
                   "webhook-signature": signature(secret, "msg_1", now, b'{"status":"failed"}')}
        self.assertEqual(Webhook(secret).verify(b'{"status":"failed"}', headers), {"status": "failed"})
        with self.assertRaises(WebhookVerificationError):
            Webhook(secret).verify(b'{"status":"succeeded"}', headers)
        with self.assertRaises(WebhookVerificationError):
            Webhook(webhook_secret_new()).verify(b'{"status":"failed"}', headers)

    def test_a_failed_job_is_posted_too_and_deliveries_stop_after_the_last_retry(self) -> None:
        self.start_runner()
        with FakeUpstream() as provider, FakeUpstream() as receiver:
            provider.respond(400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}})
            receiver.respond(503, b"")
            make_channel(base_url=provider.url)
            job_id = self.submit_with_callback(f"{receiver.url}/h").json()["id"]
            eventually(lambda: WebhookDelivery.objects.filter(job_id=job_id).count() == 3, within=15)
            self.assertEqual(receiver.requests[0].json()["status"], "failed")
        last = WebhookDelivery.objects.filter(job_id=job_id).order_by("attempt").last()
        assert last is not None
        self.assertEqual((last.attempt, last.next_attempt_at), (3, None))  # given up after the schedule

    @override_settings(OPENOPEN8_ALLOW_PRIVATE_URLS=False)
    def test_a_callback_to_a_private_address_is_refused_at_once(self) -> None:
        make_channel(kind="placeholder")
        r = self.submit_with_callback("http://127.0.0.1:9/hook")
        self.assertEqual((r.status_code, r.json()["error"]["param"]), (400, "callback_url"))
        self.assertFalse(ImageJob.objects.exists())

    def test_a_callback_url_needs_a_job(self) -> None:
        make_channel(kind="placeholder")
        r = requests.post(f"{self.live_server_url}/v1/images/generations", headers=self.auth, timeout=10,
                          json={"model": "dall-e-2", "prompt": "a", "callback_url": "https://example.com/h"})
        self.assertEqual((r.status_code, r.json()["error"]["param"]), (400, "callback_url"))
        r = self.submit_with_callback("ftp://example.com/h")
        self.assertEqual(r.status_code, 400)
