from __future__ import annotations

from typing import Any

from gateway.models import ApiToken, UsageLog
from tests.base import ApiTestCase, ConcurrentLiveServerTestCase, assert_openai_error, post_at_once
from tests.factories import make_channel, make_price, make_token, openai_images, restore_default_prices
from tests.fake_upstream import FakeUpstream


class BudgetTests(ApiTestCase):
    def spent(self, token: ApiToken) -> int:
        return ApiToken.objects.get(pk=token.pk).spent_micros

    def test_it_charges_the_dall_e_list_price_per_image(self) -> None:
        token, key = make_token(budget="10")
        make_channel(kind="placeholder")
        cases: list[tuple[dict[str, Any], int]] = [({"model": "dall-e-2", "size": "256x256", "n": 2}, 32000),
                 ({"model": "dall-e-2", "size": "512x512"}, 18000),
                 ({"model": "dall-e-2"}, 20000),
                 ({"model": "dall-e-3"}, 40000),
                 ({"model": "dall-e-3", "size": "1792x1024"}, 80000),
                 ({"model": "dall-e-3", "size": "1024x1024", "quality": "hd"}, 80000),
                 ({"model": "dall-e-3", "size": "1024x1792", "quality": "hd"}, 120000)]
        for body, micros in cases:
            with self.subTest(body=body):
                before = self.spent(token)
                r = self.generate({"prompt": "a cat", "response_format": "b64_json", **body}, key=key)
                self.assertEqual(r.status_code, 200, r.content)
                self.assertEqual(self.spent(token) - before, micros)
                self.assertEqual(UsageLog.objects.latest("created_at").cost_micros, micros)

    def test_models_without_a_price_cost_nothing_until_the_operator_sets_one(self) -> None:
        token, key = make_token(budget="1")
        make_channel(kind="placeholder", models="flux-dev")
        self.generate({"model": "flux-dev", "prompt": "a", "size": "64x64"}, key=key)
        self.assertEqual(self.spent(token), 0)
        make_price(model="flux-dev", usd="0.003")
        self.generate({"model": "flux-dev", "prompt": "a", "size": "64x64", "n": 2}, key=key)
        self.assertEqual(self.spent(token), 6000)

    def test_a_token_without_enough_budget_gets_429_insufficient_quota_and_no_provider_call(self) -> None:
        token, key = make_token(budget="0.03")
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a", "n": 2}, key=key)
        assert_openai_error(r, 429, "insufficient_quota", "insufficient_quota")
        self.assertEqual(up.requests, [])
        self.assertEqual(self.spent(token), 0)
        log = UsageLog.objects.get()  # one row, refused, holding nothing
        self.assertEqual((log.status, log.error_code, log.reserved_micros, log.cost_micros, log.request_id),
                         ("error", "insufficient_quota", 0, 0, r["x-request-id"]))

    def test_fewer_images_than_asked_are_charged_as_delivered(self) -> None:
        token, key = make_token(budget="1")
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a", "n": 4, "response_format": "b64_json"}, key=key)
        self.assertEqual(len(r.json()["data"]), 2)
        self.assertEqual(self.spent(token), 40000)
        log = UsageLog.objects.get()
        self.assertEqual((log.n, log.images_returned, log.cost_micros, log.reserved_micros), (4, 2, 40000, 0))

    def test_a_failed_request_is_refunded_in_full(self) -> None:
        token, key = make_token(budget="1")
        with FakeUpstream() as up:
            up.respond(500, {"error": {"message": "down"}})
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-3", "prompt": "a"}, key=key)
        self.assertEqual(r.status_code, 502)
        self.assertEqual(self.spent(token), 0)
        self.assertEqual(UsageLog.objects.get().cost_micros, 0)

    def test_a_client_never_gets_more_images_than_it_asked_or_paid_for(self) -> None:
        token, key = make_token(budget="1")
        with FakeUpstream() as up:
            up.respond(200, openai_images(3))
            make_channel(base_url=up.url)
            r = self.generate({"model": "dall-e-2", "prompt": "a", "n": 1, "response_format": "b64_json"}, key=key)
        self.assertEqual(len(r.json()["data"]), 1)
        self.assertEqual(self.spent(token), 20000)


class ConcurrentBudgetTests(ConcurrentLiveServerTestCase):
    def test_a_budget_for_five_images_yields_exactly_five_under_24_concurrent_requests(self) -> None:
        restore_default_prices()
        token, key = make_token(budget="0.08")  # dall-e-2 256x256 costs 0.016: exactly five images
        with FakeUpstream() as up:
            up.respond(200, openai_images(1), delay=0.2)
            make_channel(base_url=up.url, models="dall-e-2")
            answers = post_at_once(f"{self.live_server_url}/v1/images/generations",
                                   {"model": "dall-e-2", "prompt": "a", "size": "256x256",
                                    "response_format": "b64_json"}, [key] * 24)
        results = [(answer.status_code, answer.json()) for answer in answers]
        statuses = sorted(status for status, _ in results)
        self.assertEqual(statuses, [200] * 5 + [429] * 19, results)
        refusals = [body["error"]["code"] for status, body in results if status == 429]
        self.assertEqual(set(refusals), {"insufficient_quota"})
        self.assertEqual(sum(len(body["data"]) for status, body in results if status == 200), 5)
        self.assertEqual(len(up.requests), 5)
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 80000)
        self.assertEqual(UsageLog.objects.filter(status="success").count(), 5)
        self.assertEqual(UsageLog.objects.filter(status="error", http_status=429).count(), 19)


class LedgerTests(ApiTestCase):
    def test_a_token_without_a_budget_is_charged_in_its_usage_rows_and_a_new_budget_counts_them(self) -> None:
        from django.contrib.auth.models import User

        make_price(model="dall-e-2", size="256x256", usd="0.016")
        token, key = make_token(name="open-ended")
        make_channel(kind="placeholder")
        for _ in range(3):
            self.generate({"model": "dall-e-2", "prompt": "a", "size": "256x256"}, key=key)
        token.refresh_from_db()
        self.assertEqual(token.spent_micros, 0)  # no running total on the token's row: no queue on it
        self.client.force_login(User.objects.create_superuser("root", "r@example.com", "pw"))
        self.assertContains(self.client.get("/admin/gateway/apitoken/"), "0.0480")
        self.client.post(f"/admin/gateway/apitoken/{token.pk}/change/", {"name": "open-ended", "enabled": "on",
                                                                          "budget": "0.06", "allowed_models": ""})
        token.refresh_from_db()
        self.assertEqual((token.budget_micros, token.spent_micros), (60000, 48000))
        self.assertEqual(self.generate({"model": "dall-e-2", "prompt": "a", "size": "256x256"}, key=key).status_code,
                         429)  # 48000 + 16000 > 60000
