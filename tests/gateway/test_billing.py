from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from unittest import mock

from gateway.billing import budget_adjust
from gateway.models import ApiToken, Period, TokenGroup, UsageLog, period_key
from tests.base import ApiTestCase, ConcurrentLiveServerTestCase, assert_openai_error, post_at_once
from tests.factories import make_channel, make_price, make_token, openai_images
from tests.fake_upstream import FakeUpstream


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def frozen(when: datetime) -> Any:
    """The clock as every part of the gateway reads it, stopped at ``when``."""
    return mock.patch("django.utils.timezone.now", return_value=when)


class PeriodTests(ApiTestCase):
    def spent(self, token: ApiToken) -> int:
        return ApiToken.objects.get(pk=token.pk).spent_micros

    def test_a_daily_budget_starts_again_at_midnight_utc_without_any_job(self) -> None:
        make_price(model="flux", usd="0.02")
        token, key = make_token(budget="0.05", budget_period=Period.DAY)
        make_channel(kind="placeholder", models="flux")
        ask = {"model": "flux", "prompt": "a", "size": "64x64"}
        with frozen(at(2026, 12, 3, 23, 59)):
            answers = [self.generate(ask, key=key).status_code for _ in range(3)]
            token.refresh_from_db()
            self.assertEqual((token.spent_this_period(), token.period_ends()), (40000, at(2026, 12, 4)))
        self.assertEqual(answers, [200, 200, 429])
        with frozen(at(2026, 12, 4, 0, 0, 1)):
            self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_this_period(), 0)  # the admin's view
            self.assertEqual(self.generate(ask, key=key).status_code, 200)
        self.assertEqual(self.spent(token), 20000)
        self.assertEqual(UsageLog.objects.filter(status="success").count(), 3)

    def test_a_hold_from_a_period_that_ended_is_not_refunded_into_the_next(self) -> None:
        token, _key = make_token(budget="1", budget_period=Period.DAY)
        with frozen(at(2026, 12, 3, 12)):
            key_then = token.current_period()
            ApiToken.objects.filter(pk=token.pk).update(spent_micros=30000, period_key=key_then)
        with frozen(at(2026, 12, 4, 1)):
            # The next day's first request renewed the budget; a late refund of yesterday's hold changes nothing.
            ApiToken.objects.filter(pk=token.pk).update(spent_micros=5000, period_key=token.current_period())
            budget_adjust(UsageLog(token_id=token.pk, budget_period=key_then), micros=-30000)
        self.assertEqual(self.spent(token), 5000)


def test_periods_start_at_utc_boundaries_or_the_creation_anniversary() -> None:
    now = at(2026, 3, 18, 15, 30)
    assert period_key(Period.ONCE, now, None) == 0
    assert period_key(Period.DAY, now, None) == int(at(2026, 3, 18).timestamp())
    assert period_key(Period.WEEK, now, None) == int(at(2026, 3, 16).timestamp())  # a Monday
    assert period_key(Period.MONTH, now, None) == int(at(2026, 3, 1).timestamp())
    born = at(2025, 1, 31, 9)
    assert period_key(Period.ANNIVERSARY, now, born) == int(at(2026, 2, 28, 9).timestamp())  # no 31st in February
    assert period_key(Period.ANNIVERSARY, at(2026, 3, 31, 10), born) == int(at(2026, 3, 31, 9).timestamp())
    assert period_key(Period.ANNIVERSARY, at(2026, 1, 5), born) == int(at(2025, 12, 31, 9).timestamp())


class GroupTests(ApiTestCase):
    def test_a_group_caps_its_tokens_together_and_its_multiplier_is_charged(self) -> None:
        make_price(model="flux", usd="0.02")
        group = TokenGroup.objects.create(name="acme", budget_micros=90000, multiplier=Decimal("1.5"))
        first, first_key = make_token(name="a", group=group)
        second, second_key = make_token(name="b", group=group, budget="1")
        make_channel(kind="placeholder", models="flux")
        ask = {"model": "flux", "prompt": "a", "size": "64x64"}
        answers = [self.generate(ask, key=k).status_code for k in (first_key, second_key, first_key, second_key)]
        self.assertEqual(answers, [200, 200, 200, 429])  # 0.03 each: three fit the group's 0.09
        refused = assert_openai_error(self.generate(ask, key=second_key), 429, "insufficient_quota",
                                      "insufficient_quota")
        self.assertIn("group", refused["message"])
        self.assertEqual(TokenGroup.objects.get().spent_micros, 90000)
        self.assertEqual(ApiToken.objects.get(pk=second.pk).spent_micros, 30000)
        costs = list(UsageLog.objects.filter(status="success").values_list("cost_micros", "group_id"))
        self.assertEqual(costs, [(30000, group.pk)] * 3)
        self.assertEqual(UsageLog.objects.filter(status="success").first().unit_prices,  # type: ignore[union-attr]
                         {"usd_per_image": "0.020000", "group_multiplier": "1.5000"})

    def test_the_group_refusal_leaves_the_tokens_budget_untouched(self) -> None:
        make_price(model="flux", usd="0.02")
        group = TokenGroup.objects.create(name="tight", budget_micros=10000)
        token, key = make_token(group=group, budget="1")
        make_channel(kind="placeholder", models="flux")
        self.assertEqual(self.generate({"model": "flux", "prompt": "a", "size": "64x64"}, key=key).status_code, 429)
        self.assertEqual((ApiToken.objects.get(pk=token.pk).spent_micros, TokenGroup.objects.get().spent_micros),
                         (0, 0))


class ConcurrentGroupTests(ConcurrentLiveServerTestCase):
    def test_a_group_budget_for_five_images_yields_exactly_five_across_its_tokens_under_24_requests(self) -> None:
        make_price(model="dall-e-2", size="256x256", usd="0.016")
        group = TokenGroup.objects.create(name="team", budget_micros=80000, budget_period=Period.MONTH)
        keys = [make_token(name=f"t{i}", group=group)[1] for i in range(3)]
        with FakeUpstream() as up:
            up.respond(200, openai_images(1), delay=0.2)
            make_channel(base_url=up.url, models="dall-e-2")
            answers = post_at_once(f"{self.live_server_url}/v1/images/generations",
                                   {"model": "dall-e-2", "prompt": "a", "size": "256x256"},
                                   [keys[i % 3] for i in range(24)])
        results = [answer.status_code for answer in answers]
        self.assertEqual(sorted(results), [200] * 5 + [429] * 19)
        self.assertEqual(len(up.requests), 5)
        self.assertEqual(TokenGroup.objects.get().spent_micros, 80000)
        self.assertEqual(sum(UsageLog.objects.values_list("cost_micros", flat=True)), 80000)


class BalanceEndpointTests(ApiTestCase):
    """The legacy billing endpoints as one-api and new-api serve them, read as a client front-end reads them."""

    def get(self, path: str, key: str) -> Any:
        return self.client.get(path, headers={"Authorization": f"Bearer {key}"})

    def made_at(self, when: datetime, answer: Any) -> None:
        """Date the request's usage row as if it had been made at ``when``."""
        self.assertEqual(answer.status_code, 200)
        UsageLog.objects.filter(request_id=answer["x-request-id"]).update(created_at=when)

    def test_subscription_reports_the_keys_limit_or_the_systems_for_an_unlimited_key(self) -> None:
        group = TokenGroup.objects.create(name="acme", budget_micros=2_500_000)
        _t, limited = make_token(budget="7.5", expires_at=at(2027, 1, 1))
        _t, grouped = make_token(name="g", budget="7.5", group=group)
        _t, open_ended = make_token(name="o")
        bodies = [self.get("/v1/dashboard/billing/subscription", k).json() for k in (limited, grouped, open_ended)]
        for body in bodies:
            self.assertEqual(set(body), {"object", "has_payment_method", "soft_limit_usd", "hard_limit_usd",
                                         "system_hard_limit_usd", "access_until"})
            self.assertEqual(body["object"], "billing_subscription")
        self.assertEqual([(b["hard_limit_usd"], b["access_until"]) for b in bodies],
                         [(7.5, int(at(2027, 1, 1).timestamp())), (2.5, 0), (100_000_000.0, 0)])

    def test_usage_reports_cents_spent_by_day_within_the_dates(self) -> None:
        make_price(model="flux", usd="0.02")
        make_price(model="sdxl", usd="0.005")
        token, key = make_token()
        make_channel(kind="placeholder", models="flux,sdxl")
        for when, model in ((at(2026, 11, 30, 23), "flux"), (at(2026, 12, 1, 8), "flux"), (at(2026, 12, 1, 9), "sdxl"),
                            (at(2026, 12, 2, 1), "flux")):
            self.made_at(when, self.generate({"model": model, "prompt": "a", "size": "64x64"}, key=key))
        r = self.get("/v1/dashboard/billing/usage?start_date=2026-12-01&end_date=2026-12-02", key)
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(r.json(), {"object": "list", "total_usage": 2.5, "daily_costs": [
            {"timestamp": int(at(2026, 12, 1).timestamp()),
             "line_items": [{"name": "flux", "cost": 2.0}, {"name": "sdxl", "cost": 0.5}]}]})
        _other, other_key = make_token(name="other")
        self.assertEqual(self.get("/v1/dashboard/billing/usage?start_date=2026-12-01&end_date=2026-12-02",
                                  other_key).json()["total_usage"], 0)

    def test_bad_dates_and_missing_keys_get_openai_errors(self) -> None:
        _t, key = make_token()
        for query in ("start_date=yesterday", "start_date=2026-12-02&end_date=2026-12-01",
                      "start_date=2026-01-01&end_date=2026-12-01", "start_date="):
            with self.subTest(query=query):
                assert_openai_error(self.get(f"/v1/dashboard/billing/usage?{query}", key), 400,
                                    "invalid_request_error", None, "start_date")
        assert_openai_error(self.get("/v1/dashboard/billing/usage?start_date=2026-12-01&days=3", key), 400,
                            "invalid_request_error", None, "days")
        assert_openai_error(self.client.get("/v1/dashboard/billing/subscription"), 401, "invalid_request_error",
                            "invalid_api_key")

    def test_the_default_range_is_the_last_hundred_days_today_included(self) -> None:
        make_price(model="flux", usd="0.02")
        _t, key = make_token()
        make_channel(kind="placeholder", models="flux")
        for when in (at(2026, 8, 25, 23), at(2026, 8, 26, 1), at(2026, 12, 3, 11)):
            self.made_at(when, self.generate({"model": "flux", "prompt": "a", "size": "64x64"}, key=key))
        with frozen(at(2026, 12, 3, 12)):
            r = self.get("/v1/dashboard/billing/usage", key)
        self.assertEqual((r.status_code, r.json()["total_usage"]), (200, 4.0))
