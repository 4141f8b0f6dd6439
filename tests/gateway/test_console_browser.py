"""The console in a real browser (Chromium, headless): the dashboard an operator lands on draws its charts from the
traffic, its exports and the usage export download as CSV that parses, a Chinese browser reads it in Chinese, and
the console defects once seen stay fixed. With OPENOPEN8_SCREENSHOTS=<folder> the dashboard is photographed there
(``make screenshots`` writes docs/dashboard-en.png and docs/dashboard-zh.png)."""

from __future__ import annotations

import csv
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests
from django.conf import settings
from django.test import override_settings
from django.utils import timezone

from channels.models import Channel
from gateway.models import ApiToken, FailedAuthentication, TokenGroup, UsageLog
from gateway.state import shared_state
from tests.browser import BrowserTestCase, wait_for
from tests.factories import make_channel, make_token, make_usage_log

MODELS = {"gpt-image-2": 0.042, "gpt-image-1.5": 0.034, "seedream-4.0": 0.03, "dall-e-3": 0.04}


def traffic(days: int = 7, per_hour: int = 4) -> dict[str, Any]:
    """A week of a small business's traffic: four models on three channels, five keys in two groups, a channel
    that failed for a while, an exhausted budget."""
    rng = random.Random(8)
    channels = [make_channel(name="openai-main", models="gpt-image-2,gpt-image-1.5,dall-e-3", priority=10),
                make_channel(name="azure-eastus", kind="azure", models="gpt-image-2,dall-e-3",
                             base_url="https://example.openai.azure.com"),
                make_channel(name="seedream", kind="ark", models="seedream-4.0")]
    agency = TokenGroup.objects.create(name="agency", budget_micros=50_000_000)
    studio = TokenGroup.objects.create(name="studio")
    tokens = [make_token(name="shop-frontend", budget="40")[0], make_token(name="agency-bot", group=agency)[0],
              make_token(name="studio-batch", group=studio)[0], make_token(name="mobile-app")[0],
              make_token(name="intern-test", budget="2")[0]]
    now = timezone.now()
    rows, spent = [], {t.pk: 0 for t in tokens}
    for hour in range(days * 24 - 1):  # all within the last `days` days
        busy = per_hour + int(per_hour * 0.8 * (1 + ((hour % 24) - 12) / 12))
        for i in range(rng.randint(1, busy)):
            model = rng.choice(list(MODELS))
            channel = channels[2] if model.startswith("seedream") else channels[0 if rng.random() < 0.7 else 1]
            failing = channel is channels[1] and 30 < hour < 40
            error = failing or rng.random() < 0.04
            token = rng.choice(tokens)
            cost = 0 if error else int(MODELS[model] * 1_000_000 * rng.choice((1, 1, 1, 2)))
            spent[token.pk] += cost
            rows.append(UsageLog(
                request_id=f"req_{hour:04d}{i:04d}", created_at=now - timedelta(hours=hour, minutes=rng.randint(0, 59)),
                endpoint="generations", model=model, channel=channel, token=token, group=token.group,
                status=UsageLog.Status.ERROR if error else UsageLog.Status.SUCCESS,
                http_status=502 if failing else 429 if error else 200,
                error_code="upstream_error" if failing else "rate_limit_exceeded" if error else "",
                images_returned=0 if error else cost // int(MODELS[model] * 1_000_000), cost_micros=cost))
    UsageLog.objects.bulk_create(rows)
    for token in tokens:
        if token.budget_micros is not None:
            ApiToken.objects.filter(pk=token.pk).update(spent_micros=min(spent[token.pk], token.budget_micros))
    TokenGroup.objects.filter(pk=agency.pk).update(spent_micros=41_300_000)
    Channel.objects.filter(pk=channels[1].pk).update(last_error="The provider failed (HTTP 503).",
                                                     last_error_at=now)
    return {"channels": channels, "tokens": tokens, "rows": len(rows)}


def shoot(browser: Any, name: str) -> None:
    folder = os.environ.get("OPENOPEN8_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / name))


class DashboardBrowserTests(BrowserTestCase):
    def test_an_operator_lands_on_the_dashboard_and_its_charts_are_drawn_from_the_traffic(self) -> None:
        made = traffic()
        self.log_in(then="/")
        wait_for(lambda: self.browser.current_url.endswith("/admin/dashboard/"))
        charts = wait_for(lambda: self.browser.execute_script(
            "return (window.dashboardCharts || []).map(c => [c.canvas.id, c.data.datasets.map("
            "d => d.data.reduce((a, b) => a + b, 0)), c.canvas.getBoundingClientRect().height])"))
        drawn = {canvas: (sums, height) for canvas, sums, height in charts}
        self.assertEqual(set(drawn), {"chart-traffic", "chart-spend", "chart-by-model", "chart-by-channel",
                                      "chart-by-token", "chart-by-group"})
        for canvas, (sums, height) in drawn.items():
            self.assertGreater(height, 100, canvas)
            self.assertGreater(sum(sums), 0, canvas)  # every chart has data to show
        self.browser.find_element("id", "range-week").click()
        wait_for(lambda: "range=week" in self.browser.current_url)
        week = int(self.text("#card-requests .value"))
        self.assertEqual(week, made["rows"])  # a week of rows, every one counted
        self.assertIn("azure-eastus", self.text("#failing"))  # its last error is recent
        self.assertIn("agency", self.text("#budgets"))
        self.browser.execute_script("window.scrollTo(0, 0)")
        shoot(self.browser, "dashboard-en.png")

    def test_a_breakdown_and_the_filtered_usage_list_download_as_csv_that_parses(self) -> None:
        traffic(days=2)
        self.log_in(then="/admin/dashboard/?range=week")
        self.browser.find_element("id", "export-model").click()
        with self.downloaded().open(newline="") as f:
            by_model = {row["model"]: row for row in csv.DictReader(f)}
        self.assertEqual(set(by_model), set(MODELS))
        self.assertEqual(sum(int(r["requests"]) for r in by_model.values()), UsageLog.objects.count())
        self.open("/admin/gateway/usagelog/?http_status=502")
        self.browser.find_element("id", "export-csv").click()
        with self.downloaded().open(newline="") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), UsageLog.objects.filter(http_status=502).count())
        self.assertTrue(rows and {r["error_code"] for r in rows} == {"upstream_error"})

    @override_settings(TIME_ZONE="Asia/Shanghai")
    def test_times_are_shown_in_the_operators_time_zone(self) -> None:
        make_usage_log(created_at=timezone.now().replace(hour=1, minute=30, second=0, microsecond=0))
        self.log_in(then="/admin/dashboard/")
        self.assertIn("Asia/Shanghai", self.text(".dash-ranges"))
        self.open("/admin/gateway/usagelog/")
        self.assertIn("9:30 a.m.", self.text("#result_list"))


class ChineseDashboardBrowserTests(BrowserTestCase):
    language = "zh-CN"

    def test_a_chinese_browser_reads_the_console_in_chinese_and_the_api_stays_english(self) -> None:
        traffic()
        self.log_in(then="/")
        wait_for(lambda: self.browser.execute_script("return (window.dashboardCharts || []).length") == 6)
        page = self.text()
        for text in ("仪表盘", "最近 24 小时", "请求数", "花费（美元）", "当前故障渠道", "最接近用完的预算", "按模型"):
            self.assertIn(text, page)
        legend = self.browser.execute_script("return window.dashboardCharts[0].data.datasets.map(d => d.label)")
        self.assertEqual(legend, ["请求数", "错误数", "图片数"])
        self.browser.execute_script("window.scrollTo(0, 0)")
        shoot(self.browser, "dashboard-zh.png")
        self.open("/admin/")
        self.assertIn("API 令牌", self.text())
        r = requests.post(f"{self.live_server_url}/v1/images/generations", json={"prompt": "a"}, timeout=5,
                          headers={"Authorization": "Bearer sk-nosuchkey000000000000000", "Accept-Language": "zh-CN"})
        self.assertEqual(r.json()["error"]["code"], "invalid_api_key")
        self.assertTrue(r.json()["error"]["message"].startswith("Incorrect API key provided"))


class PhoneDashboardBrowserTests(BrowserTestCase):
    width, height = 390, 844

    def test_on_a_phone_the_dashboard_fits_the_screens_width(self) -> None:
        traffic(days=1)
        self.log_in(then="/admin/dashboard/")
        wait_for(lambda: self.browser.execute_script("return (window.dashboardCharts || []).length") == 6)
        width = self.browser.execute_script("return document.documentElement.clientWidth")
        cards = self.browser.execute_script(
            "return [...document.querySelectorAll('.dash-card, .dash-chart')]"
            ".map(e => e.getBoundingClientRect().right)")
        self.assertTrue(cards)
        self.assertLessEqual(max(cards), width + 1)


class ConsoleDefectBrowserTests(BrowserTestCase):
    """Each defect found in the console by an operator, tried again in the browser."""

    def test_reloading_the_new_key_page_shows_the_key_no_more_and_makes_no_second_token(self) -> None:
        from selenium.webdriver.common.by import By

        self.log_in(then="/admin/gateway/apitoken/add/")
        self.browser.find_element(By.NAME, "name").send_keys("reloaded")
        self.browser.find_element(By.NAME, "_save").click()
        key = wait_for(lambda: self.browser.find_element(By.ID, "new-api-key").text)
        self.assertTrue(key.startswith("sk-"))
        self.browser.execute_cdp_cmd("Browser.grantPermissions", {
            "origin": self.live_server_url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]})
        copy = self.browser.find_element(By.ID, "copy-api-key")
        self.assertEqual(copy.text, "Copy")
        copy.click()
        wait_for(lambda: copy.text == "Copied")
        self.assertEqual(self.browser.execute_script("return navigator.clipboard.readText()"), key)
        self.browser.refresh()
        wait_for(lambda: self.browser.find_element(By.ID, "key-gone"))
        self.assertNotIn(key, self.browser.page_source)
        self.assertEqual(ApiToken.objects.filter(name="reloaded").count(), 1)

    def test_the_channel_list_shows_the_demo_the_open_circuit_and_the_status_columns_on_screen(self) -> None:
        make_channel(kind="placeholder", name="Placeholder (demo)", demo=True)
        broken = make_channel(name="broken-east", last_error="The provider failed (HTTP 500). " * 4)
        for _ in range(settings.OPENOPEN8_BREAKER_THRESHOLD):
            shared_state().circuit_failed(broken.pk)
        self.log_in(then="/admin/channels/channel/")
        table = self.text("#result_list")
        self.assertIn("DEMO", table)
        self.assertIn("open for", table)
        self.assertNotIn("Circuit object", table)
        rights = self.browser.execute_script(
            "return Object.fromEntries(['column-status', 'column-circuit_state', 'column-last_test'].map("
            "c => [c, document.querySelector('th.' + c).getBoundingClientRect().right]))")
        for column, right in rights.items():
            self.assertLessEqual(right, 1440, column)  # seen without scrolling
        self.open(f"/admin/channels/channel/{broken.pk}/change/")
        self.assertIn("The provider failed (HTTP 500). " * 3, self.text(".field-last_error"))  # not cut at 60

    def test_the_channel_form_follows_the_type_and_a_bad_config_is_a_form_error(self) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import Select

        self.log_in(then="/admin/channels/channel/add/")
        Select(self.browser.find_element(By.ID, "id_kind")).select_by_value("dashscope")
        shown = self.browser.execute_script(
            "return [...document.querySelectorAll('.oo8-kind-help')].filter(h => !h.hidden).map(h => h.dataset.kind)")
        self.assertEqual(shown, ["dashscope"])
        ticked = self.browser.execute_script(
            "return [...document.querySelectorAll('input[name=endpoints]')].filter(b => b.checked).map(b => b.value)")
        self.assertEqual(ticked, ["generations"])
        Select(self.browser.find_element(By.ID, "id_kind")).select_by_value("openai")
        self.browser.find_element(By.NAME, "name").send_keys("typo")
        self.browser.find_element(By.NAME, "served_models").send_keys("gpt-image-2")
        config = self.browser.find_element(By.NAME, "config")
        config.clear()
        config.send_keys("[1, 2]")
        self.browser.find_element(By.NAME, "_save").click()
        error = wait_for(lambda: self.text(".field-config .errorlist"))
        self.assertIn("must be a JSON object of settings", error)
        self.assertFalse(Channel.objects.exists())
        self.open("/admin/gateway/nosuchthing/")
        self.assertNotIn('"error"', self.browser.page_source)  # the console's page, not the API's JSON
        self.assertIn("Not Found", self.browser.title + self.text())

    def test_bad_values_are_refused_used_tokens_stay_and_refused_keys_are_seen(self) -> None:
        from selenium.webdriver.common.by import By

        token, _key = make_token(name="used-once")
        make_usage_log(token=token, status="success", http_status=200)
        requests.post(f"{self.live_server_url}/v1/images/generations", json={"prompt": "a"}, timeout=5,
                      headers={"Authorization": "Bearer sk-wrongkey1234567890abcdef"})
        self.log_in(then="/admin/gateway/price/add/")
        self.browser.find_element(By.NAME, "model").send_keys("gpt-image-2")
        self.browser.find_element(By.NAME, "usd_per_image").send_keys("-0.05")
        self.browser.find_element(By.NAME, "_save").click()
        self.assertIn("A price cannot be below zero.", wait_for(lambda: self.text(".errorlist")))
        self.open(f"/admin/gateway/apitoken/{token.pk}/change/")
        self.assertEqual(self.browser.find_elements(By.CSS_SELECTOR, "a.deletelink"), [])
        self.open("/admin/gateway/failedauthentication/")
        self.assertIn("sk-wrongkey", self.text("#result_list"))
        self.assertEqual(FailedAuthentication.objects.get().count, 1)

    def test_a_usage_row_shows_its_attempts_as_a_table_and_the_list_filters_by_code_and_status(self) -> None:
        from selenium.webdriver.common.by import By

        log = make_usage_log(status="error", http_status=502, error_code="upstream_error", cost_micros=0,
                             attempts=[{"channel": 1, "name": "east", "outcome": "error", "status": 502,
                                        "code": "upstream_error", "message": "The provider failed (HTTP 500).",
                                        "latency_ms": 812}])
        make_usage_log(status="success", http_status=200, cost_micros=40_000)
        self.log_in(then=f"/admin/gateway/usagelog/{log.pk}/change/")
        cells = [td.text for td in self.browser.find_elements(By.CSS_SELECTOR, ".field-attempts_table td")]
        self.assertEqual(cells[:5], ["east", "error", "502", "upstream_error", "812"])
        self.open("/admin/gateway/usagelog/")
        filters = self.text("#changelist-filter")
        self.assertIn("By error code", filters)
        self.assertIn("By http status", filters)
        self.browser.find_element(By.LINK_TEXT, "502").click()
        wait_for(lambda: "http_status=502" in self.browser.current_url)
        self.assertEqual(len(self.browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")), 1)
        self.open("/admin/gateway/usagelog/?status__exact=success")
        self.assertIn("0.0400", self.text("#result_list .field-cost_usd"))  # USD, as on the row's page
