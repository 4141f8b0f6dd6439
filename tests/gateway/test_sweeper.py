"""Clearing up after requests whose worker died (gateway/sweeper.py)."""

from __future__ import annotations

from datetime import timedelta

from django.test import TestCase
from django.utils import timezone

from gateway.models import ApiToken, UsageLog
from gateway.sweeper import usage_sweep
from tests.factories import make_token, make_usage_log


class SweeperTests(TestCase):
    def test_an_abandoned_request_is_failed_and_refunded_once(self) -> None:
        token, _ = make_token(budget="1")
        ApiToken.objects.filter(pk=token.pk).update(spent_micros=60000)
        stale = make_usage_log(token=token, status="pending", reserved_micros=40000, budget_period=0,
                               created_at=timezone.now() - timedelta(hours=1))
        fresh = make_usage_log(token=token, status="pending", reserved_micros=20000, budget_period=0)
        self.assertEqual(usage_sweep(), 1)
        self.assertEqual(usage_sweep(), 0)
        stale.refresh_from_db()
        self.assertEqual((stale.status, stale.error_code, stale.reserved_micros), ("error", "abandoned", 0))
        self.assertEqual(UsageLog.objects.get(pk=fresh.pk).status, "pending")
        self.assertEqual(ApiToken.objects.get(pk=token.pk).spent_micros, 20000)

    def test_the_sweep_command_reports_what_it_did(self) -> None:
        from io import StringIO

        from django.core.management import call_command

        out = StringIO()
        call_command("sweep", stdout=out)
        self.assertIn("Swept 0 abandoned request(s).", out.getvalue())
