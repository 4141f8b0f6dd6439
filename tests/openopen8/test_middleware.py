"""The console-only middleware (openopen8/middleware.py): the console speaks the browser's language, the client API
OpenAI's English."""

from __future__ import annotations

from django.test import TestCase

from tests.factories import make_channel, make_token


class LanguageTests(TestCase):
    def test_the_console_follows_the_browsers_language(self) -> None:
        chinese = self.client.get("/admin/login/", headers={"Accept-Language": "zh-CN,zh;q=0.9"}).content.decode()
        self.assertIn("用户名", chinese)  # Django's own admin strings, in Simplified Chinese
        english = self.client.get("/admin/login/", headers={"Accept-Language": "en-US"}).content.decode()
        self.assertIn("Username", english)
        self.assertNotIn("用户名", english)

    def test_the_client_api_answers_in_english_whatever_the_client_asks(self) -> None:
        make_channel(kind="placeholder")
        _, key = make_token()
        for headers in ({}, {"Accept-Language": "zh-CN"}):
            with self.subTest(headers=headers):
                self.client.get("/admin/login/", headers={"Accept-Language": "zh-CN"})  # a console page first
                r = self.client.post("/v1/images/generations", "prompt=a", content_type="text/plain",
                                     headers={"Authorization": f"Bearer {key}", **headers})
                self.assertEqual(r.status_code, 415)
                self.assertTrue(r.json()["error"]["message"].startswith("Unsupported media type"))
                r = self.client.post("/v1/images/generations", {"prompt": "a", "n": "two"},
                                     content_type="application/json",
                                     headers={"Authorization": f"Bearer {key}", **headers})
                self.assertEqual(r.json()["error"]["message"], "Invalid type for 'n': expected an integer.")
