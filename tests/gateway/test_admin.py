from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from decimal import Decimal

from django.conf import settings
from django.contrib.admin.utils import quote
from django.contrib.auth.models import User
from django.test import TestCase, override_settings

from channels.models import Channel
from gateway.models import ApiToken, ImageJob, Price, TokenGroup, UsageLog
from gateway.state import shared_state
from gateway.webhooks import webhook_secret
from tests.base import post_json
from tests.factories import make_channel, make_price, make_token, make_usage_log

SECRET = "sk-provider-VERY-SECRET-9876"


class AdminTests(TestCase):
    def setUp(self) -> None:
        self.admin = User.objects.create_superuser("root", "root@example.com", "pw")
        self.client.force_login(self.admin)

    def test_creating_a_token_shows_its_key_once_and_the_key_works(self) -> None:
        make_channel(kind="placeholder")
        r = self.client.post("/admin/gateway/apitoken/add/", {"name": "ci-bot", "enabled": "on", "budget": "2.50",
                                                                "allowed_models": "dall-e-2"})
        token = ApiToken.objects.get(name="ci-bot")
        self.assertRedirects(r, f"/admin/gateway/apitoken/{token.pk}/key/", fetch_redirect_response=False)
        page = self.client.get(r["Location"]).content.decode()
        shown = re.search(r'id="new-api-key"[^>]*>(sk-[A-Za-z0-9_-]+)<', page)
        assert shown is not None
        key = shown.group(1)
        self.assertIn('id="copy-api-key"', page)
        # Reloading the page shows the key no more, and creates nothing.
        again = self.client.get(r["Location"]).content.decode()
        self.assertNotIn(key, again)
        self.assertIn('id="key-gone"', again)
        self.assertEqual(ApiToken.objects.filter(name="ci-bot").count(), 1)
        self.assertFalse(any(key in str(v) for v in self.client.session.values()))
        self.assertEqual((token.budget_micros, token.allowed_models), (2_500_000, "dall-e-2"))
        api = post_json(self.client, "/v1/images/generations", {"model": "dall-e-2", "prompt": "a", "size": "256x256"},
                        key)
        self.assertEqual(api.status_code, 200)
        for page in ("/admin/gateway/apitoken/", f"/admin/gateway/apitoken/{token.pk}/change/"):
            html = self.client.get(page).content.decode()
            self.assertNotIn(key, html)
            self.assertIn(f"sk-{token.key_prefix}", html)

    def test_jobs_are_listed_and_a_queued_one_is_cancelled_and_refunded_from_the_list(self) -> None:
        make_channel(kind="placeholder")
        make_price(model="dall-e-2", usd="0.02")
        token, key = make_token(name="batch", budget="1")
        r = self.client.post("/v1/images/generations", {"model": "dall-e-2", "prompt": "a"},
                             content_type="application/json", headers={"Authorization": f"Bearer {key}",
                                                                       "Prefer": "respond-async"})
        job = ImageJob.objects.get(pk=r.json()["id"])
        html = self.client.get("/admin/gateway/imagejob/").content.decode()
        self.assertIn(job.id, html)
        self.assertIn("batch", html)
        self.client.post("/admin/gateway/imagejob/", {"action": "cancel", "_selected_action": [job.id]})
        job.refresh_from_db()
        token.refresh_from_db()
        self.assertEqual((job.status, token.spent_micros), ("cancelled", 0))
        # The admin writes ids with its own quoting ("_" is "_5F"), as its links do.
        self.assertEqual(self.client.get(f"/admin/gateway/imagejob/{quote(job.id)}/change/").status_code, 200)

    def test_a_tokens_webhook_secret_is_shown_and_rotated(self) -> None:
        token, _ = make_token(name="hooks")
        first = webhook_secret(token)
        self.assertIn(first, self.client.get(f"/admin/gateway/apitoken/{token.pk}/change/").content.decode())
        self.client.post("/admin/gateway/apitoken/", {"action": "rotate_webhook_secret",
                                                      "_selected_action": [token.pk]})
        second = ApiToken.objects.get(pk=token.pk).webhook_secret
        self.assertNotEqual(second, first)
        self.assertTrue(second.startswith("whsec_"))

    def test_a_used_token_cannot_be_deleted_only_disabled(self) -> None:
        used, _ = make_token(name="used")
        make_usage_log(token=used)
        unused, _ = make_token(name="unused")
        self.assertEqual(self.client.get(f"/admin/gateway/apitoken/{used.pk}/delete/").status_code, 403)
        self.assertNotIn('class="deletelink"',
                         self.client.get(f"/admin/gateway/apitoken/{used.pk}/change/").content.decode())
        self.assertNotIn("delete_selected", self.client.get("/admin/gateway/apitoken/").content.decode())
        self.client.post(f"/admin/gateway/apitoken/{unused.pk}/delete/", {"post": "yes"})
        self.assertEqual(list(ApiToken.objects.values_list("name", flat=True)), ["used"])

    def test_bad_values_are_refused_on_save_not_kept_silently(self) -> None:
        price = {"model": "dall-e-3", "size": "1024X1024", "quality": "", "usd_per_image": "0.0123",
                 "effective_from_0": "2026-01-01", "effective_from_1": "00:00:00"}
        r = self.client.post("/admin/gateway/price/add/", {**price, "usd_per_image": "-0.05"})
        self.assertIn("cannot be below zero", r.content.decode())
        r = self.client.post("/admin/gateway/price/add/", {**price, "size": "1024 by 1024"})
        self.assertIn("WIDTHxHEIGHT", r.content.decode())
        self.client.post("/admin/gateway/price/add/", price)
        self.assertEqual(Price.objects.get(model="dall-e-3", usd_per_image=Decimal("0.0123")).size, "1024x1024")
        token = {"name": "t", "enabled": "on", "budget": "", "allowed_models": "dall-e-3,dalle-3"}
        r = self.client.post("/admin/gateway/apitoken/add/", token)
        self.assertIn("No channel serves dalle-3", r.content.decode())
        r = self.client.post("/admin/gateway/apitoken/add/", {**token, "allowed_models": "dall-e-3",
                                                               "expires_at_0": "2020-01-01", "expires_at_1": "00:00"})
        self.assertIn("That moment has passed", r.content.decode())
        self.assertFalse(ApiToken.objects.filter(name="t").exists())

    def test_a_usage_row_shows_money_in_usd_and_its_attempts_as_a_table_and_filters_by_code_and_status(self) -> None:
        log = make_usage_log(status="error", http_status=502, error_code="upstream_error", cost_micros=1_234_500,
                             attempts=[{"channel": 1, "name": "east", "outcome": "error", "status": 502,
                                        "code": "upstream_error", "message": "The provider failed (HTTP 500).",
                                        "latency_ms": 812}])
        make_usage_log(status="success", http_status=200)
        page = self.client.get(f"/admin/gateway/usagelog/{log.pk}/change/").content.decode()
        self.assertIn("1.2345", page)
        self.assertNotIn("1234500", page)
        self.assertIn("<td>east</td><td>error</td><td>502</td><td>upstream_error</td><td>812</td>", page)
        listed = self.client.get("/admin/gateway/usagelog/?error_code=upstream_error&http_status=502")
        self.assertContains(listed, "1 usage log")

    def test_the_usage_list_exports_what_its_filters_show_as_csv(self) -> None:
        token, _ = make_token(name="exporter")
        UsageLog.objects.bulk_create([
            UsageLog(request_id=f"req_{i:032x}", token=token, endpoint="generations", model="dall-e-3",
                     status="error" if i % 4 == 0 else "success", http_status=502 if i % 4 == 0 else 200,
                     cost_micros=0 if i % 4 == 0 else 40000) for i in range(2500)])
        listed = self.client.get("/admin/gateway/usagelog/?status__exact=error").content.decode()
        self.assertIn('href="/admin/gateway/usagelog/export/?status__exact=error"', listed)
        r = self.client.get("/admin/gateway/usagelog/export/?status__exact=error")
        self.assertTrue(r.streaming)
        self.assertEqual(r["Content-Type"], "text/csv; charset=utf-8")
        rows = list(csv.DictReader(io.StringIO(r.getvalue().decode())))
        self.assertEqual(len(rows), 625)
        self.assertEqual({(row["status"], row["http_status"], row["token"]) for row in rows},
                         {("error", "502", "exporter")})
        everything = self.client.get("/admin/gateway/usagelog/export/")
        rows = list(csv.DictReader(io.StringIO(everything.getvalue().decode())))
        self.assertEqual((len(rows), sum(row["cost_usd"] == "0.040000" for row in rows)), (2500, 1875))

    def test_the_console_shows_times_in_the_operators_time_zone(self) -> None:
        make_usage_log(created_at=datetime(2026, 12, 3, 1, 30, tzinfo=UTC))
        with override_settings(TIME_ZONE="Asia/Shanghai"):
            html = self.client.get("/admin/gateway/usagelog/").content.decode()
        self.assertIn("Dec. 3, 2026, 9:30 a.m.", html)

    def test_the_token_list_shows_budget_spent_and_last_use(self) -> None:
        make_token(name="team-a", budget="10")
        html = self.client.get("/admin/gateway/apitoken/").content.decode()
        self.assertIn("team-a", html)
        self.assertIn("10.0000", html)
        self.assertIn("Spent (USD)", html)
        self.assertIn("OpenOpen8", html)

    def test_a_tokens_budget_can_be_changed_without_touching_its_key(self) -> None:
        token, key = make_token(name="team-b", budget="1")
        r = self.client.post(f"/admin/gateway/apitoken/{token.pk}/change/", {"name": "team-b", "enabled": "on",
                                                                              "budget": "", "allowed_models": ""})
        self.assertEqual(r.status_code, 302)
        token.refresh_from_db()
        self.assertIsNone(token.budget_micros)
        self.assertTrue(token.matches(key))

    def test_token_actions_disable_and_enable(self) -> None:
        token, _ = make_token()
        self.client.post("/admin/gateway/apitoken/", {"action": "disable", "_selected_action": [token.pk]})
        self.assertFalse(ApiToken.objects.get(pk=token.pk).enabled)
        self.client.post("/admin/gateway/apitoken/", {"action": "enable", "_selected_action": [token.pk]})
        self.assertTrue(ApiToken.objects.get(pk=token.pk).enabled)

    def channel_form(self, **overrides: object) -> dict[str, object]:
        form = {"name": "openai-main", "kind": "openai", "base_url": "https://api.example.com/v1",
                "api_key": SECRET, "served_models": "dall-e-2, dall-e-3", "model_map": "{}",
                "endpoints": ["generations", "edits"], "priority": 0,
                "weight": 1, "enabled": "on", "timeout": "", "config": "{}", "end_user": "client"}
        form.update(overrides)
        return form

    def test_a_channel_key_is_masked_everywhere_and_kept_when_left_empty(self) -> None:
        r = self.client.post("/admin/channels/channel/add/", self.channel_form())
        self.assertEqual(r.status_code, 302, r.content[:2000])
        channel = Channel.objects.get()
        self.assertEqual((channel.api_key, channel.endpoints), (SECRET, "generations,edits"))
        for page in ("/admin/channels/channel/", f"/admin/channels/channel/{channel.pk}/change/"):
            html = self.client.get(page).content.decode()
            self.assertNotIn(SECRET, html)
            self.assertIn("…9876", html)
        self.client.post(f"/admin/channels/channel/{channel.pk}/change/", self.channel_form(api_key="", priority=7))
        channel.refresh_from_db()
        self.assertEqual((channel.api_key, channel.priority), (SECRET, 7))
        self.client.post(f"/admin/channels/channel/{channel.pk}/change/", self.channel_form(api_key="sk-new-key-1234"))
        channel.refresh_from_db()
        self.assertEqual(channel.api_key, "sk-new-key-1234")

    def test_a_channel_with_a_bad_config_cannot_be_saved(self) -> None:
        r = self.client.post("/admin/channels/channel/add/",
                             self.channel_form(kind="sd-webui", config=json.dumps({"steps": "lots"})))
        self.assertEqual(r.status_code, 200)
        self.assertIn("steps has the wrong type", r.content.decode())
        r = self.client.post("/admin/channels/channel/add/", self.channel_form(config=json.dumps({"nope": 1})))
        self.assertIn("unknown keys: nope", r.content.decode())
        r = self.client.post("/admin/channels/channel/add/", self.channel_form(base_url="ftp://x"))
        self.assertIn("http(s) URL", r.content.decode())
        for config in ("[1, 2]", '"b64_json"', "7"):
            r = self.client.post("/admin/channels/channel/add/", self.channel_form(config=config))
            self.assertEqual(r.status_code, 200)  # the form again, with the error on the field
            self.assertIn("must be a JSON object of settings", r.content.decode())
        self.assertFalse(Channel.objects.exists())

    def test_a_mistyped_console_address_gets_the_consoles_404_page(self) -> None:
        r = self.client.get("/admin/gateway/nosuchthing/")
        self.assertEqual(r.status_code, 404)
        self.assertTrue(r["Content-Type"].startswith("text/html"))
        self.assertEqual(self.client.get("/v1/nosuchthing").json()["error"]["type"], "invalid_request_error")

    def test_the_channel_list_shows_each_channels_circuit_state(self) -> None:
        healthy, broken = make_channel(name="healthy"), make_channel(name="broken")
        for _ in range(settings.OPENOPEN8_BREAKER_THRESHOLD):
            shared_state().circuit_failed(broken.pk)
        shared_state().circuit_failed(healthy.pk)
        html = self.client.get("/admin/channels/channel/").content.decode()
        self.assertIn("open for", html)
        self.assertIn("closed (1 recent fault)", html)
        self.assertNotIn("Circuit object", html)

    def test_the_channel_form_tells_what_each_type_serves_and_reads(self) -> None:
        page = self.client.get("/admin/channels/channel/add/").content.decode()
        self.assertIn("channels/channel_form.js", page)
        sd = re.search(r'<div class="oo8-kind-help" data-kind="sd-webui" data-endpoints="([^"]*)">(.*?)</div>', page)
        assert sd is not None
        self.assertEqual(sd.group(1), "generations,edits,variations")
        self.assertIn("steps", sd.group(2))
        self.assertIn("up to 1 input image(s); files: image, mask", sd.group(2))
        self.assertIn('data-kind="dashscope" data-endpoints="generations"', page)
        self.assertEqual(self.client.get("/static/channels/channel_form.js").status_code, 200)

    def test_the_demo_channel_is_labelled_as_such(self) -> None:
        make_channel(kind="placeholder", name="Placeholder (demo)", demo=True)
        self.assertIn("DEMO", self.client.get("/admin/channels/channel/").content.decode())

    def test_channel_actions_disable_and_enable_and_the_list_shows_status(self) -> None:
        channel = make_channel(base_url="http://127.0.0.1:9", last_error="The provider failed (HTTP 500).")
        html = self.client.get("/admin/channels/channel/").content.decode()
        self.assertIn("failing: The provider failed (HTTP 500).", html)
        self.client.post("/admin/channels/channel/", {"action": "disable", "_selected_action": [channel.pk]})
        self.assertFalse(Channel.objects.get(pk=channel.pk).enabled)
        self.client.post("/admin/channels/channel/", {"action": "enable", "_selected_action": [channel.pk]})
        self.assertTrue(Channel.objects.get(pk=channel.pk).enabled)

    def test_usage_logs_are_read_only_and_filterable(self) -> None:
        token, _ = make_token(name="filterme")
        channel = make_channel(base_url="http://127.0.0.1:9")
        log = make_usage_log(token=token, channel=channel, model="dall-e-3", status="error", http_status=502,
                             error_code="upstream_error")
        make_usage_log(model="dall-e-2", status="success")
        listing = self.client.get("/admin/gateway/usagelog/", {"model": "dall-e-3", "status": "error",
                                                               "token__id__exact": str(token.pk),
                                                               "channel__id__exact": str(channel.pk)})
        self.assertEqual(listing.status_code, 200)
        self.assertContains(listing, log.request_id)
        self.assertNotContains(listing, "req_test_1")
        self.assertEqual(self.client.get("/admin/gateway/usagelog/add/").status_code, 403)
        detail = self.client.get(f"/admin/gateway/usagelog/{log.pk}/change/")
        self.assertEqual(detail.status_code, 200)
        self.assertNotContains(detail, 'name="_save"')
        self.client.post(f"/admin/gateway/usagelog/{log.pk}/change/", {"model": "tampered"})
        log.refresh_from_db()
        self.assertEqual(log.model, "dall-e-3")

    def test_usage_logs_drill_down_by_date(self) -> None:
        # The date hierarchy groups by truncated dates: the query shape that parameter binding on the server could
        # break on PostgreSQL.
        log = make_usage_log(model="dall-e-3", status="success")
        when = log.created_at
        for query in ({}, {"created_at__year": when.year},
                      {"created_at__year": when.year, "created_at__month": when.month},
                      {"created_at__year": when.year, "created_at__month": when.month, "created_at__day": when.day}):
            listing = self.client.get("/admin/gateway/usagelog/", query)
            self.assertEqual(listing.status_code, 200, query)
            self.assertContains(listing, log.request_id)

    def test_prices_are_listed_with_the_dall_e_defaults(self) -> None:
        html = self.client.get("/admin/gateway/price/").content.decode()
        self.assertIn("dall-e-3", html)
        self.assertIn("0.120000", html)
        self.assertIn("gpt-image-1.5", html)  # priced by tokens out of the box
        self.assertIn("32.000000", html)

    def test_a_group_and_a_renewing_budget_are_set_from_the_console_and_show_what_is_left(self) -> None:
        r = self.client.post("/admin/gateway/tokengroup/add/", {"name": "acme", "budget": "20",
                                                                 "budget_period": "month", "multiplier": "1.25"})
        self.assertEqual(r.status_code, 302, r.content[:2000])
        group = TokenGroup.objects.get()
        self.assertEqual((group.budget_micros, group.budget_period, group.multiplier), (20_000_000, "month",
                                                                                     Decimal("1.25")))
        token, _key = make_token(name="acme-ci")
        r = self.client.post(f"/admin/gateway/apitoken/{token.pk}/change/", {
            "name": "acme-ci", "enabled": "on", "budget": "3", "budget_period": "day", "group": group.pk,
            "allowed_models": ""})
        self.assertEqual(r.status_code, 302, r.content[:2000])
        token.refresh_from_db()
        ApiToken.objects.filter(pk=token.pk).update(spent_micros=1_250_000, period_key=token.current_period())
        html = self.client.get("/admin/gateway/apitoken/").content.decode()
        self.assertIn("3.0000 / daily (UTC)", html)
        self.assertIn("1.7500", html)  # left today
        self.assertIn("acme", html)
        groups = self.client.get("/admin/gateway/tokengroup/").content.decode()
        self.assertIn("20.0000 / monthly (UTC, from the 1st)", groups)
