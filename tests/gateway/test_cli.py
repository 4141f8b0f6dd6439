from __future__ import annotations

import io

from django.core.management import CommandError, call_command
from django.test import TestCase

from channels.models import Channel
from gateway.hosting import image_store
from gateway.models import ApiToken
from tests.base import post_json
from tests.factories import png_bytes


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


class OperatorCliTests(TestCase):
    def test_createtoken_prints_the_key_alone_on_its_last_line(self) -> None:
        key = run("createtoken", "ci", "--budget", "2.5", "--models", "dall-e-2,dall-e-3",
                  "--expires", "2099-12-31").strip().splitlines()[-1]
        self.assertRegex(key, r"^sk-[A-Za-z0-9_-]{32,}$")
        token = ApiToken.objects.get(name="ci")
        self.assertTrue(token.matches(key))
        self.assertEqual((token.budget_micros, token.allowed_models), (2_500_000, "dall-e-2,dall-e-3"))
        assert token.expires_at is not None
        self.assertEqual(token.expires_at.date().isoformat(), "2099-12-31")

    def test_createtoken_refuses_bad_values(self) -> None:
        for args in (["--budget", "lots"], ["--budget", "-1"], ["--expires", "tomorrow"]):
            with self.subTest(args=args), self.assertRaises(CommandError):
                run("createtoken", "x", *args)
        self.assertFalse(ApiToken.objects.exists())

    def test_addchannel_prints_the_id_of_a_working_channel(self) -> None:
        channel_id = run("addchannel", "sd", "--type", "sd-webui", "--base-url", "http://127.0.0.1:7860",
                         "--key", "user:pw", "--models", "sdxl,dall-e-3", "--priority", "5", "--weight", "3",
                         "--map", "dall-e-3=sdxl.safetensors", "--config", '{"steps": 20}').strip()
        channel = Channel.objects.get(pk=int(channel_id))
        self.assertEqual((channel.kind, channel.priority, channel.weight), ("sd-webui", 5, 3))
        self.assertEqual(channel.model_map, {"dall-e-3": "sdxl.safetensors"})
        self.assertEqual(channel.config, {"steps": 20})
        self.assertTrue(channel.serves("sdxl") and channel.serves("dall-e-3") and not channel.serves("x"))

    def test_addchannel_refuses_what_the_admin_would_refuse(self) -> None:
        for args in (["--config", '{"steps": 0}'], ["--config", "{nope"], ["--map", "nomapping"],
                     ["--base-url", "not-a-url"]):
            with self.subTest(args=args), self.assertRaises(CommandError):
                run("addchannel", "bad", "--type", "sd-webui", "--base-url", "http://h:1", "--models", "m", *args)
        self.assertFalse(Channel.objects.exists())

    def test_purgeimages_deletes_only_expired_images(self) -> None:
        fresh = image_store(png_bytes(), ttl=3600)
        stale = image_store(png_bytes(), ttl=-1)
        self.assertIn("Deleted 1 expired image(s).", run("purgeimages"))
        self.assertEqual(self.client.get(f"/v1/images/files/{fresh}").status_code, 200)
        self.assertEqual(self.client.get(f"/v1/images/files/{stale}").status_code, 404)

    def test_bootstrap_sets_up_a_working_demo_only_on_an_empty_database(self) -> None:
        out = run("bootstrap", "--url", "http://127.0.0.1:8000")
        key = next(word for word in out.split() if word.startswith("sk-"))
        self.assertIn("curl http://127.0.0.1:8000/v1/images/generations", out)
        self.assertEqual((Channel.objects.get().kind, Channel.objects.get().demo), ("placeholder", True))
        r = post_json(self.client, "/v1/images/generations", {"model": "dall-e-3", "prompt": "a"}, key)
        self.assertEqual(r.status_code, 200)
        again = run("bootstrap")
        self.assertNotIn("sk-", again)
        self.assertEqual((ApiToken.objects.count(), Channel.objects.count()), (1, 1))

