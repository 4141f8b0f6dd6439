from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.utils import timezone

from gateway.models import ApiToken, Period, Price, TokenGroup, UsageLog
from gateway.pricing import Ask, Tokens, hold_micros, output_tokens_ceiling, price_in_effect, tokens_from_usage
from tests.base import ApiTestCase, ConcurrentLiveServerTestCase, assert_openai_error, post_at_once
from tests.factories import make_channel, make_price, make_token, make_token_price, openai_images
from tests.fake_upstream import FakeUpstream, Recorded

# gpt-image-2.6-flare as an operator would price its family (USD per 1M tokens).
FLARE: dict[str, Any] = {"model": "gpt-image-2.6*", "text_input": "5", "image_input": "8", "cached_input": "1.25",
         "image_output": "30", "text_output": "10"}
USAGE = {"input_tokens": 1000, "input_tokens_details": {"text_tokens": 400, "image_tokens": 600, "cached_tokens": 100},
         "output_tokens": 5000, "output_tokens_details": {"image_tokens": 4800, "text_tokens": 200},
         "total_tokens": 6000}
# (400 - 100) x 5 + 600 x 8 + 100 x 1.25 + 4800 x 30 + 200 x 10 micro-dollars
USAGE_MICROS = 1500 + 4800 + 125 + 144000 + 2000


def with_usage(usage: dict[str, Any], images: int = 1) -> dict[str, Any]:
    return openai_images(images, usage=usage)


class TokenPriceTests(ApiTestCase):
    def spent(self, token: ApiToken) -> int:
        return ApiToken.objects.get(pk=token.pk).spent_micros

    def test_a_token_priced_model_is_charged_exactly_what_its_usage_says(self) -> None:
        price = make_token_price(**FLARE)
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, with_usage(USAGE))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            r = self.generate({"model": "gpt-image-2.6-flare", "prompt": "a lighthouse", "quality": "high",
                               "size": "1024x1536"}, key=key)
        self.assertEqual(r.status_code, 200, r.content)
        self.assertEqual(r.json()["usage"], USAGE)  # the client sees the provider's usage as OpenAI reports it
        self.assertEqual(self.spent(token), USAGE_MICROS)
        log = UsageLog.objects.get()
        self.assertEqual((log.cost_micros, log.overrun_micros, log.price_id), (USAGE_MICROS, 0, price.pk))
        self.assertEqual((log.input_text_tokens, log.input_image_tokens, log.cached_input_tokens,
                          log.output_image_tokens, log.output_text_tokens), (300, 600, 100, 4800, 200))
        self.assertEqual(log.unit_prices, {"usd_per_1m_text_input": "5.000000", "usd_per_1m_image_input": "8.000000",
                                           "usd_per_1m_cached_input": "1.250000",
                                           "usd_per_1m_image_output": "30.000000",
                                           "usd_per_1m_text_output": "10.000000", "usd_per_image": "0.000000"})
        # Held before the call: one high portrait at 6,240 output tokens, plus the prompt and OpenAI's overhead.
        self.assertEqual(log.hold_micros, 6240 * 30 + (len("a lighthouse") + 64) * 5)

    def test_the_readmes_worked_example_holds_and_charges_what_it_says(self) -> None:
        make_token_price(**FLARE)
        group = TokenGroup.objects.create(name="customer", budget_micros=20_000_000, multiplier=Decimal("1.2"))
        token, key = make_token(group=group, budget="20", budget_period=Period.MONTH)
        with FakeUpstream() as up:
            up.respond(200, with_usage(USAGE))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            self.generate({"model": "gpt-image-2.6-flare", "prompt": "a lighthouse", "quality": "high",
                           "size": "1024x1536"}, key=key)
        log = UsageLog.objects.get()
        self.assertEqual((log.hold_micros, log.cost_micros), (225096, 182910))
        self.assertEqual((self.spent(token), TokenGroup.objects.get().spent_micros), (182910, 182910))

    def test_output_without_details_is_priced_as_image_tokens(self) -> None:
        make_token_price(**FLARE)
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, with_usage({"input_tokens": 50, "output_tokens": 1000, "total_tokens": 1050}))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            self.assertEqual(self.generate({"model": "gpt-image-2.6-flare", "prompt": "x"}, key=key).status_code, 200)
        self.assertEqual(self.spent(token), 50 * 5 + 1000 * 30)

    def test_usage_beyond_the_hold_is_charged_and_recorded_as_the_overrun(self) -> None:
        make_token_price(**FLARE, ceiling="0.01")  # an operator's ceiling far below what this model uses
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, with_usage(USAGE))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            self.generate({"model": "gpt-image-2.6-flare", "prompt": "x"}, key=key)
        log = UsageLog.objects.get()
        self.assertEqual(log.hold_micros, 10000 + (1 + 64) * 5)
        self.assertEqual((log.cost_micros, log.overrun_micros), (USAGE_MICROS, USAGE_MICROS - log.hold_micros))
        self.assertEqual(self.spent(token), USAGE_MICROS)

    def test_a_budget_that_cannot_cover_the_hold_refuses_before_the_provider_is_called(self) -> None:
        make_token_price(**FLARE)
        _token, key = make_token(budget="0.2")  # two high squares hold 0.2496 and more
        with FakeUpstream() as up:
            up.respond(200, with_usage(USAGE, 2))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            r = self.generate({"model": "gpt-image-2.6-flare", "prompt": "x", "n": 2, "quality": "high"}, key=key)
        assert_openai_error(r, 429, "insufficient_quota", "insufficient_quota")
        self.assertEqual(up.requests, [])

    def test_fewer_images_than_asked_are_charged_by_the_usage_of_those_delivered(self) -> None:
        make_token_price(**FLARE)
        token, key = make_token(budget="5")
        delivered = {"input_tokens": 20, "output_tokens": 2000, "total_tokens": 2020}
        with FakeUpstream() as up:
            up.respond(200, with_usage(delivered, 2))  # asked for 3, two made
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            r = self.generate({"model": "gpt-image-2.6-flare", "prompt": "x", "n": 3}, key=key)
        self.assertEqual(len(r.json()["data"]), 2)
        self.assertEqual(self.spent(token), 20 * 5 + 2000 * 30)

    def test_an_answer_without_usage_is_charged_per_image(self) -> None:
        make_token_price(model="self-hosted-image", image_output="30", ceiling="0.05")
        Price.objects.filter(model="self-hosted-image").update(usd_per_image=Decimal("0.02"))
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, openai_images(2))
            make_channel(base_url=up.url, models="self-hosted-image")
            self.generate({"model": "self-hosted-image", "prompt": "x", "n": 2}, key=key)
        self.assertEqual(self.spent(token), 40000)
        self.assertIsNone(UsageLog.objects.get().output_image_tokens)

    def test_an_answer_without_usage_on_a_row_with_only_token_rates_costs_an_images_output_by_the_table(self) -> None:
        make_token_price(**FLARE)
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, openai_images(1))
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            self.generate({"model": "gpt-image-2.6-flare", "prompt": "x", "quality": "medium",
                           "size": "1536x1024"}, key=key)
        self.assertEqual(self.spent(token), 1568 * 30)

    def test_the_gpt_image_models_are_priced_by_tokens_out_of_the_box(self) -> None:
        from tests.factories import restore_default_prices

        restore_default_prices()
        token, key = make_token(budget="5")
        with FakeUpstream() as up:
            up.respond(200, with_usage({"input_tokens": 10, "output_tokens": 4160, "total_tokens": 4170}))
            make_channel(base_url=up.url, models="gpt-image-1.5,gpt-image-2")
            for model in ("gpt-image-1.5", "gpt-image-2"):
                self.assertEqual(self.generate({"model": model, "prompt": "x"}, key=key).status_code, 200)
        self.assertEqual([row.cost_micros for row in UsageLog.objects.order_by("created_at")],
                         [10 * 5 + 4160 * 32, 10 * 5 + 4160 * 30])

    def test_a_price_takes_effect_from_its_time_and_changing_it_rewrites_no_past_cost(self) -> None:
        old = make_price(model="flux", usd="0.010")
        token, key = make_token(budget="5")
        make_channel(kind="placeholder", models="flux")
        self.generate({"model": "flux", "prompt": "a", "size": "64x64"}, key=key)
        raised = Price.objects.create(model="flux", usd_per_image=Decimal("0.030"),
                                      effective_from=timezone.now() - timedelta(seconds=1))
        Price.objects.create(model="flux", usd_per_image=Decimal("9"),
                             effective_from=timezone.now() + timedelta(days=1))
        self.generate({"model": "flux", "prompt": "a", "size": "64x64"}, key=key)
        Price.objects.filter(pk=old.pk).update(usd_per_image=Decimal("1"))  # rewrites nothing already charged
        first, second = UsageLog.objects.order_by("created_at")
        self.assertEqual([(first.cost_micros, first.price_id, first.unit_prices["usd_per_image"]),
                          (second.cost_micros, second.price_id, second.unit_prices["usd_per_image"])],
                         [(10000, old.pk, "0.010000"), (30000, raised.pk, "0.030000")])
        self.assertEqual(self.spent(token), 40000)


class ConcurrentTokenBillingTests(ConcurrentLiveServerTestCase):
    def test_32_concurrent_token_priced_requests_are_charged_exactly_and_never_past_the_budget(self) -> None:
        make_token_price(**FLARE)
        hold = 4160 * 30 + (1 + 64) * 5  # a high square, prompt "x"
        token, key = make_token(budget=str(Decimal(hold * 10) / 1_000_000))  # room for ten holds at once
        lock, served = threading.Lock(), [0]

        def provider(request: Recorded) -> Any:
            with lock:  # every answer reports different usage, so the sum is checked, not a multiple
                served[0] += 1
                tokens = 1000 + served[0]
            return with_usage({"input_tokens": 7, "output_tokens": tokens, "total_tokens": tokens + 7})

        with FakeUpstream() as up:
            up.respond(200, provider, delay=0.2)
            make_channel(base_url=up.url, models="gpt-image-2.6-flare")
            answers = post_at_once(f"{self.live_server_url}/v1/images/generations",
                                   {"model": "gpt-image-2.6-flare", "prompt": "x", "quality": "high",
                                    "size": "1024x1024"}, [key] * 32)
        results = [answer.status_code for answer in answers]
        rows = UsageLog.objects.filter(status="success")
        self.assertEqual(len(results), 32)
        self.assertEqual(rows.count(), results.count(200))
        self.assertGreaterEqual(results.count(200), 10)  # holds come back as answers settle: later ones fit again
        self.assertEqual(set(results), {200, 429} if 429 in results else {200})
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, sum(r.cost_micros for r in rows))
        self.assertEqual(sum(r.cost_micros for r in rows), sum(7 * 5 + (r.output_image_tokens or 0) * 30 for r in rows))
        self.assertEqual(len(up.requests), rows.count())
        self.assertFalse(UsageLog.objects.filter(status="pending").exists())


# Database-free: the arithmetic on plain values.
@dataclass
class Row:
    model: str = "m"
    size: str = ""
    quality: str = ""
    usd_per_image: Decimal = Decimal(0)
    usd_per_1m_text_input: Decimal | None = None
    usd_per_1m_image_input: Decimal | None = None
    usd_per_1m_cached_input: Decimal | None = None
    usd_per_1m_image_output: Decimal | None = None
    usd_per_1m_text_output: Decimal | None = None
    ceiling_usd_per_image: Decimal | None = None
    effective_from: datetime | None = None


def test_the_most_specific_row_in_effect_wins() -> None:
    now = timezone.now()
    rows = [Row(model="gpt-image-*"), Row(model="gpt-image-2.6*"), Row(model="gpt-image-2.6*", quality="high"),
            Row(model="gpt-image-2.6-flare"), Row(model="gpt-image-2.6-flare", effective_from=now + timedelta(1))]
    assert price_in_effect(rows, model="gpt-image-2.6-flare", size=None, quality="high", at=now) is rows[3]
    assert price_in_effect(rows, model="gpt-image-2.6-max", size=None, quality="high", at=now) is rows[2]
    assert price_in_effect(rows, model="gpt-image-2.6-max", size=None, quality="low", at=now) is rows[1]
    assert price_in_effect(rows, model="gpt-image-1.5", size=None, quality=None, at=now) is rows[0]
    assert price_in_effect(rows, model="dall-e-3", size=None, quality=None, at=now) is None
    later = now + timedelta(days=2)
    assert price_in_effect(rows, model="gpt-image-2.6-flare", size=None, quality=None, at=later) is rows[4]


def test_usage_is_read_as_openai_reports_it() -> None:
    assert tokens_from_usage(None) is None and tokens_from_usage({"total_tokens": 3}) is None
    assert tokens_from_usage(USAGE) == Tokens(300, 600, 100, 4800, 200)
    assert tokens_from_usage({"input_tokens": 9, "output_tokens": 4}) == Tokens(9, 0, 0, 4, 0)
    assert tokens_from_usage({"input_tokens": 9, "input_tokens_details": {"image_tokens": 5, "cached_tokens": 7},
                              "output_tokens": 1}) == Tokens(0, 2, 7, 1, 0)  # cached: text first, then image


def test_the_hold_follows_openais_output_table() -> None:
    assert [output_tokens_ceiling("1024x1536", q) for q in ("low", "medium", "high", "auto", "hd")] == [
        408, 1584, 6240, 6240, 6240]
    assert output_tokens_ceiling("2048x2048", "high") == 4160 * 4
    assert output_tokens_ceiling(None, "low") == 408
    row = Row(usd_per_1m_image_output=Decimal(30), usd_per_1m_text_input=Decimal(5),
              usd_per_1m_image_input=Decimal(8))
    edit = Ask(n=2, size="1536x1024", quality="medium", prompt_chars=10, input_images=1, calls=2)
    assert hold_micros(row, edit) == 2 * 1568 * 30 + 2 * ((10 + 64) * 5 + 6240 * 8)
    assert hold_micros(Row(usd_per_image=Decimal("0.04")), edit) == 80000
    assert hold_micros(None, edit) == 0
