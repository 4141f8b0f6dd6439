from __future__ import annotations

from datetime import timedelta

from django.contrib.auth.models import User
from django.utils import timezone

from gateway.models import ApiToken, FailedAuthentication, UsageLog
from tests.base import ApiTestCase, assert_openai_error
from tests.factories import make_channel, make_token


class AuthenticationTests(ApiTestCase):
    def setUp(self) -> None:
        super().setUp()
        make_channel(kind="placeholder", models="dall-e-2,dall-e-3")

    def test_it_rejects_a_missing_bearer_token(self) -> None:
        r = self.generate({"prompt": "a cat"}, key=None)
        error = assert_openai_error(r, 401, "invalid_request_error", "invalid_api_key")
        self.assertIn("Authorization: Bearer", error["message"])
        self.assertEqual(r["WWW-Authenticate"], "Bearer")

    def test_it_rejects_an_unknown_key_without_echoing_it(self) -> None:
        wrong = "sk-" + "x" * 40
        r = self.generate({"prompt": "a cat"}, key=wrong)
        error = assert_openai_error(r, 401, "invalid_request_error", "invalid_api_key")
        self.assertNotIn(wrong, error["message"])

    def test_it_rejects_a_key_with_the_right_prefix_but_wrong_rest(self) -> None:
        forged = self.key[:11] + ("A" if self.key[11] != "A" else "B") + self.key[12:]
        assert_openai_error(self.generate({"prompt": "a cat"}, key=forged), 401, "invalid_request_error",
                            "invalid_api_key")

    def test_it_rejects_a_non_bearer_scheme(self) -> None:
        r = self.client.post("/v1/images/generations", data="{}", content_type="application/json",
                             HTTP_AUTHORIZATION=f"Basic {self.key}")
        assert_openai_error(r, 401, "invalid_request_error", "invalid_api_key")

    def test_it_rejects_a_disabled_key(self) -> None:
        ApiToken.objects.filter(pk=self.token.pk).update(enabled=False)
        error = assert_openai_error(self.generate({"prompt": "a cat"}), 401, "invalid_request_error", "invalid_api_key")
        self.assertIn("disabled", error["message"])

    def test_it_rejects_an_expired_key(self) -> None:
        ApiToken.objects.filter(pk=self.token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
        error = assert_openai_error(self.generate({"prompt": "a cat"}), 401, "invalid_request_error", "invalid_api_key")
        self.assertIn("expired", error["message"])

    def test_it_accepts_a_key_that_expires_later(self) -> None:
        ApiToken.objects.filter(pk=self.token.pk).update(expires_at=timezone.now() + timedelta(days=1))
        self.assertEqual(self.generate({"prompt": "a cat", "size": "256x256"}).status_code, 200)

    def test_it_refuses_a_model_outside_the_tokens_list_with_403(self) -> None:
        _token, key = make_token(name="limited", allowed_models="dall-e-2")
        error = assert_openai_error(self.generate({"model": "dall-e-3", "prompt": "a cat"}, key=key), 403,
                                    "invalid_request_error", "model_not_allowed", "model")
        self.assertIn("dall-e-3", error["message"])
        ok = self.generate({"model": "dall-e-2", "prompt": "a cat", "size": "256x256"}, key=key)
        self.assertEqual(ok.status_code, 200)

    def test_it_stores_only_a_prefix_and_a_keyed_hash(self) -> None:
        token = ApiToken.objects.get(pk=self.token.pk)
        self.assertTrue(self.key.startswith("sk-") and len(self.key) >= 35)
        self.assertEqual(token.key_prefix, self.key[3:11])
        self.assertEqual(len(token.key_hash), 64)
        for value in (token.key_prefix, token.key_hash, token.name):
            self.assertNotIn(self.key[11:], value)

    def test_it_records_last_use(self) -> None:
        self.generate({"prompt": "a cat", "size": "256x256"})
        self.assertIsNotNone(ApiToken.objects.get(pk=self.token.pk).last_used_at)

    def test_a_rejected_key_writes_no_usage_row(self) -> None:
        self.generate({"prompt": "a cat"}, key="sk-" + "y" * 40)
        self.assertEqual(UsageLog.objects.count(), 0)


class RefusedKeyTests(ApiTestCase):
    def test_refused_keys_are_counted_by_how_they_begin_and_shown_to_the_operator(self) -> None:
        wrong = "sk-wrongwrongwrongwrongwrongwrongwrong01"
        for _ in range(3):
            self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a"}, key=wrong).status_code, 401)
        disabled, disabled_key = make_token(name="old", enabled=False)
        self.generate({"model": "dall-e-2", "prompt": "a"}, key=disabled_key)
        rows = {(r.key_start, r.reason): r for r in FailedAuthentication.objects.all()}
        self.assertEqual(rows[("sk-wrongwro", "unknown")].count, 3)
        self.assertEqual(rows[(f"sk-{disabled.key_prefix}", "disabled")].token_id, disabled.pk)
        self.assertFalse(any(wrong in str(vars(r)) for r in rows.values()))  # never the key itself
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        html = self.client.get("/admin/gateway/failedauthentication/").content.decode()
        self.assertIn("sk-wrongwro", html)
        metrics = self.client.get("/metrics").content.decode()
        self.assertIn('openopen8_auth_failures_total{reason="unknown"}', metrics)
