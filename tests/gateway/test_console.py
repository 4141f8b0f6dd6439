from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta

from django.contrib.auth.models import Permission, User
from django.test import TestCase
from django.utils import timezone

from gateway.models import TokenGroup, UsageLog
from tests.factories import make_channel, make_token, make_usage_log


class DashboardTests(TestCase):
    def setUp(self) -> None:
        self.client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
        self.main = make_channel(name="main-openai", models="gpt-image-2")
        self.token, _key = make_token(name="shop", budget="10")
        now = timezone.now()
        for i in range(30):
            make_usage_log(created_at=now - timedelta(hours=i * 2), model="gpt-image-2", channel=self.main,
                           token=self.token, status=UsageLog.Status.ERROR if i % 10 == 0 else UsageLog.Status.SUCCESS,
                           images_returned=0 if i % 10 == 0 else 1, cost_micros=0 if i % 10 == 0 else 50_000)

    def test_the_dashboard_shows_the_periods_totals_and_chart_data(self) -> None:
        r = self.client.get("/admin/dashboard/?range=week")
        self.assertEqual(r.status_code, 200)
        html = r.content.decode()
        # 30 rows two hours apart: the week holds them all; 3 errors.
        self.assertRegex(html, r'id="card-requests"><div class="value">30<')
        self.assertRegex(html, r'id="card-spend"><div class="value">\$1\.35<')
        self.assertRegex(html, r'id="card-error-rate"><div class="value">10\.0%<')
        found = re.search(r'<script id="dashboard-data" type="application/json">(.*?)</script>', html, re.S)
        assert found is not None
        data = json.loads(found.group(1))
        self.assertEqual(len(data["labels"]), 29)  # 6-hour points over 7 days
        self.assertEqual(sum(data["requests"]), 30)
        self.assertEqual(data["by_model"]["labels"], ["gpt-image-2"])
        self.assertIn("chart-4.6.1.umd.min.js", html)
        day = self.client.get("/admin/dashboard/?range=day").content.decode()
        self.assertRegex(day, r'id="card-requests"><div class="value">12<')

    def test_each_breakdown_exports_as_csv(self) -> None:
        for name, label in (("model", "gpt-image-2"), ("channel", "main-openai"), ("token", str(self.token))):
            r = self.client.get(f"/admin/dashboard/?range=month&export={name}")
            self.assertEqual(r["Content-Type"], "text/csv; charset=utf-8")
            rows = list(csv.DictReader(io.StringIO(r.content.decode())))
            self.assertEqual([(row[name], row["requests"], row["errors"], row["spend_usd"]) for row in rows],
                             [(label, "30", "3", "1.350000")])
        self.assertEqual(self.client.get("/admin/dashboard/?export=nothing").status_code, 404)

    def test_failing_channels_and_budgets_nearest_their_end_are_listed(self) -> None:
        make_channel(name="set-aside", enabled=False, disabled_reason="every key was rejected: invalid_api_key")
        make_channel(name="healthy")
        group = TokenGroup.objects.create(name="agency", budget_micros=1_000_000, spent_micros=950_000)
        make_token(name="agency-bot", budget="100", group=group)
        html = self.client.get("/admin/dashboard/").content.decode()
        failing = html[html.index('id="failing"'):html.index('id="budgets"')]
        self.assertIn("set-aside", failing)
        self.assertIn("every key was rejected: invalid_api_key", failing)
        self.assertIn("main-openai", failing)  # its error of the last hour
        self.assertNotIn("healthy", failing)
        budgets = html[html.index('id="budgets"'):]
        self.assertLess(budgets.index("agency"), budgets.index("shop"))  # 95 % used before 13.5 %
        self.assertIn("95%", budgets)

    def test_the_console_lands_on_the_dashboard_and_its_index_links_it_first(self) -> None:
        self.assertEqual(self.client.get("/")["Location"], "/admin/dashboard/")
        index = self.client.get("/admin/").content.decode()
        self.assertLess(index.index('href="/admin/dashboard/"'), index.index("/admin/gateway/apitoken/"))

    def test_staff_who_may_not_read_usage_do_not_see_spend(self) -> None:
        clerk = User.objects.create_user("clerk", password="pw", is_staff=True)
        self.client.force_login(clerk)
        self.assertEqual(self.client.get("/admin/dashboard/").status_code, 403)
        clerk.user_permissions.add(Permission.objects.get(codename="view_usagelog"))
        self.assertEqual(self.client.get("/admin/dashboard/").status_code, 200)
