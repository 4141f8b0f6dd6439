from __future__ import annotations

from auditlog.models import LogEntry
from django.contrib.auth.models import User
from django.test import TestCase

from channels.models import Channel
from channels.services import channel_key_reject
from gateway.models import ApiToken, Price
from tests.factories import make_channel, make_price, make_token

KEY = "sk-provider-SECRET-aaaa-1111"
NEW_KEY = "sk-provider-SECRET-bbbb-2222"


def history(obj: object) -> list[LogEntry]:
    return list(LogEntry.objects.get_for_object(obj).order_by("timestamp", "pk"))


class AuditTests(TestCase):
    def setUp(self) -> None:
        self.root = User.objects.create_superuser("root", "root@example.com", "pw")
        self.client.force_login(self.root)

    def test_an_operators_change_is_recorded_with_who_and_the_old_and_new_values(self) -> None:
        token, _key = make_token(name="shop", budget="5")
        r = self.client.post(f"/admin/gateway/apitoken/{token.pk}/change/",
                             {"name": "shop", "enabled": "on", "budget": "20", "budget_period": "month",
                              "allowed_models": "", "requests_per_minute": "30"})
        self.assertEqual(r.status_code, 302)
        entry = history(token)[-1]
        self.assertEqual(entry.actor, self.root)
        self.assertEqual(entry.action, LogEntry.Action.UPDATE)
        self.assertEqual(entry.changes_dict["budget_micros"], [5_000_000, 20_000_000])
        self.assertEqual(entry.changes_dict["requests_per_minute"], [None, 30])
        self.assertEqual(entry.changes_dict["budget_period"], ["", "month"])
        page = self.client.get(f"/admin/auditlog/logentry/{entry.pk}/change/").content.decode()
        self.assertIn("root", page)
        self.assertIn("20000000", page)

    def test_bulk_actions_are_recorded_row_by_row(self) -> None:
        channels = [make_channel(name=f"c{i}") for i in range(3)]
        self.client.post("/admin/channels/channel/", {"action": "disable",
                                                      "_selected_action": [c.pk for c in channels]})
        self.assertFalse(Channel.objects.filter(enabled=True).exists())
        for channel in channels:
            entry = history(channel)[-1]
            self.assertEqual((entry.actor, entry.changes_dict["enabled"]), (self.root, [True, False]))

    def test_the_gateways_own_changes_are_recorded_as_the_systems(self) -> None:
        channel = make_channel(name="solo", api_key=KEY)
        channel_key_reject(channel.pk, key=KEY, reason="invalid_api_key: Incorrect API key provided")
        entry = history(channel)[-1]
        self.assertIsNone(entry.actor)
        self.assertEqual(entry.changes_dict["enabled"], [True, False])
        self.assertIn("invalid_api_key", entry.changes_dict["disabled_reason"][1])
        self.assertIn("disabled_keys", entry.changes_dict)
        listing = self.client.get("/admin/auditlog/logentry/").content.decode()
        self.assertIn("system", listing)
        self.assertIn("solo", listing)

    def test_keys_appear_in_the_history_by_their_last_four_characters_only(self) -> None:
        channel = make_channel(name="keys", api_key=KEY)
        channel.api_key = f"{KEY}\n{NEW_KEY}"
        channel.save()
        entries = history(channel)
        self.assertEqual(entries[-1].changes_dict["api_key"], ["…1111", "…1111, …2222"])
        stored = " ".join(str(e.changes) + str(e.serialized_data) + e.object_repr for e in entries)
        self.assertNotIn("SECRET", stored)
        for entry in entries:
            self.assertNotIn("SECRET", self.client.get(f"/admin/auditlog/logentry/{entry.pk}/change/")
                             .content.decode())

    def test_created_and_deleted_rows_are_recorded(self) -> None:
        token, key = make_token(name="new")
        created = history(token)[0]
        self.assertEqual(created.action, LogEntry.Action.CREATE)
        self.assertNotIn("key_hash", created.changes_dict)
        self.assertNotIn(key, str(created.changes))
        price = make_price(model="gpt-image-2", usd="0.04")
        self.client.post(f"/admin/gateway/price/{price.pk}/delete/", {"post": "yes"})
        self.assertFalse(Price.objects.filter(pk=price.pk).exists())
        deleted = LogEntry.objects.filter(action=LogEntry.Action.DELETE, object_pk=str(price.pk)).get()
        self.assertEqual(deleted.actor, self.root)
        self.assertTrue(ApiToken.objects.filter(pk=token.pk).exists())
