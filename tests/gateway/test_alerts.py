"""Operator alerts (gateway/alerts.py): a channel the gateway disabled, a circuit that opened, a budget past 80 % and
100 %, each told once, to a webhook receiver on 127.0.0.1 and to the mailbox."""

from __future__ import annotations

import json
import time
from decimal import Decimal
from typing import Any

import requests
from django.core import mail
from django.test import override_settings
from standardwebhooks.webhooks import Webhook

from gateway.alerts import alert_deliver, alert_raise, budget_alerts
from gateway.models import Alert, TokenGroup, to_micros
from gateway.webhooks import webhook_secret_new
from tests.base import ApiTestCase, eventually
from tests.factories import make_channel, make_price, make_token, openai_images
from tests.fake_upstream import FakeUpstream
from tests.gateway.test_jobs import JobTestCase

OK = openai_images(1)
SECRET = webhook_secret_new()
PROVIDER_KEY = "sk-provider-only-key-7731"


class ChannelDisabledTests(JobTestCase):
    def test_the_gateway_disabling_a_channel_is_posted_signed_and_mailed_once_without_its_key(self) -> None:
        self.start_runner()
        with FakeUpstream() as rejecting, FakeUpstream() as backup, FakeUpstream() as receiver:
            rejecting.respond(401, {"error": {"message": f"Incorrect API key provided: {PROVIDER_KEY}.",
                                              "type": "invalid_request_error", "code": "invalid_api_key"}})
            backup.respond(200, OK)
            receiver.queue(503, {"error": "starting"})
            receiver.respond(204, b"")
            make_channel(name="east", base_url=rejecting.url, api_key=PROVIDER_KEY, priority=5)
            make_channel(name="west", base_url=backup.url)
            with override_settings(OPENOPEN8_ALERT_WEBHOOK_URL=f"{receiver.url}/ops",
                                   OPENOPEN8_ALERT_WEBHOOK_SECRET=SECRET, OPENOPEN8_ALERT_EMAIL=["ops@example.com"],
                                   EMAIL_HOST="smtp.example.com", OPENOPEN8_WEBHOOK_RETRIES=[0.2]):
                for _ in range(3):
                    r = requests.post(f"{self.live_server_url}/v1/images/generations", headers=self.auth,
                                      json={"model": "dall-e-2", "prompt": "a"}, timeout=10)
                    self.assertEqual(r.status_code, 200)  # the backup serves
                eventually(lambda: len(receiver.requests) == 2, within=15)
        for delivery in receiver.requests:
            self.assertEqual(delivery.path, "/ops")
            body = Webhook(SECRET).verify(delivery.body, delivery.headers)
            self.assertNotIn(PROVIDER_KEY, delivery.body.decode())
        self.assertEqual(body["type"], "channel.disabled")
        self.assertEqual(body["data"]["channel"]["name"], "east")
        self.assertIn("Incorrect API key provided", body["text"])
        self.assertIn("east", body["text"])
        alert = Alert.objects.get()
        self.assertIsNotNone(alert.delivered_at)
        self.assertEqual((alert.attempts, alert.webhook_status), (2, 204))
        self.assertEqual(len(mail.outbox), 1)  # mailed on the first try, not again
        self.assertEqual(mail.outbox[0].to, ["ops@example.com"])
        self.assertIn("'east' was disabled", mail.outbox[0].subject)
        self.assertNotIn(PROVIDER_KEY, mail.outbox[0].body)


@override_settings(OPENOPEN8_BREAKER_THRESHOLD=2, OPENOPEN8_BREAKER_COOLDOWN=0.01)
class CircuitAlertTests(ApiTestCase):
    def test_a_circuit_opening_is_told_once_not_for_each_failed_probe(self) -> None:
        with FakeUpstream() as flaky, FakeUpstream() as backup:
            flaky.respond(500, {"error": {"message": "internal error"}})
            backup.respond(200, OK)
            make_channel(name="flaky", base_url=flaky.url, priority=10)
            make_channel(name="backup", base_url=backup.url)
            self.generate({"model": "dall-e-2", "prompt": "a"})
            self.assertFalse(Alert.objects.exists())  # one fault is not a trip
            for _ in range(6):  # the trip, then probes after each short cool-down that fail again
                self.generate({"model": "dall-e-2", "prompt": "a"})
                time.sleep(0.03)
        self.assertGreater(len(flaky.requests), 3)
        alert = Alert.objects.get()
        self.assertEqual(alert.kind, "circuit.opened")
        self.assertIn("'flaky'", alert.subject)
        self.assertIn("failed 2 times in a row", alert.text)


class BudgetAlertTests(ApiTestCase):
    def spend(self, key: str) -> int:
        r = self.generate({"model": "dall-e-2", "prompt": "a", "response_format": "b64_json"}, key=key)
        return int(r.status_code)

    def test_a_tokens_budget_is_told_at_80_and_at_100_percent_once_each(self) -> None:
        make_price(model="dall-e-2", usd="0.40", size="1024x1024")
        token, key = make_token(name="acme", budget="1")
        with FakeUpstream() as up:
            up.respond(200, OK)
            make_channel(base_url=up.url)
            self.assertEqual(self.spend(key), 200)
            self.assertEqual(budget_alerts(), 0)  # 40 %
            self.assertEqual(self.spend(key), 200)
            self.assertEqual(budget_alerts(), 1)  # 80 %
            self.assertEqual(budget_alerts(), 0)  # told already
            self.assertEqual(self.spend(key), 429)  # $0.40 more does not fit: the budget is at its end
        subjects = list(Alert.objects.order_by("created_at").values_list("subject", flat=True))
        self.assertEqual(len(subjects), 2)
        self.assertIn("'acme'", subjects[0])
        self.assertIn("80 %", subjects[0])
        self.assertIn("refused", subjects[1])
        last = Alert.objects.order_by("created_at").last()
        assert last is not None
        self.assertEqual((last.data["percent"], last.data["refused"], last.data["spent_usd"]), (100, True, "0.800000"))
        self.assertEqual(budget_alerts(), 0)

    def test_a_budget_that_jumps_past_both_thresholds_is_told_once_and_raising_it_starts_afresh(self) -> None:
        group = TokenGroup.objects.create(name="team-blue", budget_micros=to_micros(Decimal("2")), spent_micros=0)
        make_token(name="blue-1", group=group)
        TokenGroup.objects.filter(pk=group.pk).update(spent_micros=to_micros(Decimal("2")))
        self.assertEqual(budget_alerts(), 1)
        alert = Alert.objects.get()
        self.assertEqual((alert.data["group"]["name"], alert.data["percent"]), ("team-blue", 100))
        TokenGroup.objects.filter(pk=group.pk).update(budget_micros=to_micros(Decimal("2.4")))
        self.assertEqual(budget_alerts(), 1)  # a new budget: 83 % of it is news
        self.assertEqual(Alert.objects.latest("created_at").data["percent"], 80)


class DeliveryTests(ApiTestCase):
    def raise_one(self) -> Alert:
        alert = alert_raise("test:1", Alert.Kind.CIRCUIT_OPENED, "Circuit of channel 'x' opened", "It failed.", {})
        assert alert is not None
        return alert

    def test_without_a_webhook_or_mail_the_alert_is_kept_for_the_console_only(self) -> None:
        self.raise_one()
        self.assertIsNone(alert_raise("test:1", Alert.Kind.CIRCUIT_OPENED, "again", "again", {}))
        self.assertEqual(Alert.objects.count(), 1)

    def test_a_receiver_that_never_takes_it_is_tried_the_configured_times_then_given_up(self) -> None:
        alert = self.raise_one()
        with FakeUpstream() as receiver, override_settings(OPENOPEN8_ALERT_WEBHOOK_URL=receiver.url,
                                                           OPENOPEN8_WEBHOOK_RETRIES=[5, 60]):
            receiver.respond(500, {"error": "down"})
            self.assertEqual([alert_deliver(alert.pk, n) for n in (1, 2, 3)], [5.0, 60.0, None])
            body: dict[str, Any] = json.loads(receiver.requests[0].body)
        self.assertEqual((body["type"], body["text"]), ("circuit.opened", "It failed."))
        self.assertNotIn("webhook-signature", receiver.requests[0].headers)  # no secret set: unsigned
        alert.refresh_from_db()
        self.assertIsNone(alert.delivered_at)
        self.assertEqual((alert.attempts, alert.last_error), (3, "webhook answered HTTP 500"))

    def test_the_console_lists_alerts_read_only(self) -> None:
        from django.contrib.auth.models import User

        alert = self.raise_one()
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        page = self.client.get("/admin/gateway/alert/")
        self.assertContains(page, "Circuit of channel &#x27;x&#x27; opened")
        self.assertEqual(self.client.get(f"/admin/gateway/alert/{alert.pk}/change/").status_code, 200)
        self.assertEqual(self.client.get("/admin/gateway/alert/add/").status_code, 403)
