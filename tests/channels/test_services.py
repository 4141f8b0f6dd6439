"""Channel operations (channels/services.py): testing a channel from the console."""

from __future__ import annotations

from unittest import mock

from django.contrib.auth.models import User
from django.test import TransactionTestCase

from channels.models import Channel
from tests.factories import make_channel, openai_images
from tests.fake_upstream import FakeUpstream, Overlapping


class ChannelTestActionTests(TransactionTestCase):  # the tests run in threads of their own, on their own connections
    def setUp(self) -> None:
        self.client.force_login(User.objects.create_superuser("root", "r@example.com", "pw"))

    def act(self, action: str, channel: Channel) -> str:
        r = self.client.post("/admin/channels/channel/", {"action": action, "_selected_action": [channel.pk]},
                             follow=True)
        return r.content.decode()

    def test_the_cheap_probe_asks_for_the_model_list_with_each_key_and_records_the_result(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, lambda req: (200, {"data": []}) if req.headers["Authorization"].endswith("good-0001")
                       else (401, {"error": {"message": "bad key"}}))
            channel = make_channel(base_url=up.url + "/v1", api_key="sk-key-good-0001\nsk-key-bad-00002")
            page = self.act("test_probe", channel)
        self.assertEqual([(r.method, r.path) for r in up.requests], [("GET", "/v1/models")] * 2)
        self.assertIn("key …0001: answered in", page)
        self.assertIn("key …0002: The provider rejected the channel&#x27;s credentials", page)
        self.assertNotIn("sk-key-bad-00002", page)
        channel.refresh_from_db()
        self.assertFalse(channel.last_test_ok)
        self.assertIsNotNone(channel.last_test_latency_ms)
        self.assertIn("…0001: answered", channel.last_test_message)

    def test_the_real_test_makes_one_smallest_image(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            channel = make_channel(base_url=up.url, models="dall-e-3,dall-e-2")
            page = self.act("test_generation", channel)
        body = up.requests[0].json()
        self.assertEqual((body["model"], body["size"], body["n"]), ("dall-e-3", "1024x1024", 1))
        self.assertIn("1 image(s) from dall-e-3", page)
        channel.refresh_from_db()
        self.assertTrue(channel.last_test_ok)

    def test_a_passed_test_clears_the_failing_status(self) -> None:
        with FakeUpstream() as up:
            up.respond(200, {"data": []})
            channel = make_channel(base_url=up.url + "/v1", last_error="The provider failed (HTTP 500).")
            self.act("test_probe", channel)
        html = self.client.get("/admin/channels/channel/").content.decode()
        self.assertNotIn("failing", html)
        channel.refresh_from_db()
        self.assertEqual(channel.last_error, "")

    def test_channels_are_tested_at_once_and_the_page_waits_a_bounded_time(self) -> None:
        slow = Overlapping({"data": []}, 0.5)

        with FakeUpstream() as up:
            up.respond(200, slow)
            channels = [make_channel(base_url=up.url + "/v1", name=f"slow {i}") for i in range(3)]
            self.client.post("/admin/channels/channel/", {"action": "test_probe",
                                                          "_selected_action": [c.pk for c in channels]})
            self.assertEqual(slow.most, 3)  # all three providers asked at once
            up.respond(200, {"data": []}, delay=3)
            with mock.patch("channels.admin.TEST_WITHIN_S", 0.3):
                page = self.act("test_probe", channels[0])
        self.assertIn("still testing after 0.3 s", page)
