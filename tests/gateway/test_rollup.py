from __future__ import annotations

from datetime import UTC, datetime, timedelta

from django.test import TestCase

from gateway.models import RolledHour, UsageHour, UsageLog
from gateway.rollup import HOUR, SETTLE, Totals, by_dimension, by_hour, usage_rollup
from tests.factories import make_channel, make_token, make_usage_log

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)


def at(hours_ago: float) -> datetime:
    return NOW - timedelta(hours=hours_ago)


class RollupTests(TestCase):
    def setUp(self) -> None:
        self.channel = make_channel(name="main")
        self.token, _key = make_token(name="team")

    def row(self, hours_ago: float, **fields: object) -> UsageLog:
        fields.setdefault("status", UsageLog.Status.SUCCESS)
        fields.setdefault("images_returned", 1)
        fields.setdefault("cost_micros", 40_000)
        fields.setdefault("model", "gpt-image-2")
        fields.setdefault("channel", self.channel)
        fields.setdefault("token", self.token)
        return make_usage_log(created_at=at(hours_ago), **fields)

    def test_totals_of_rolled_hours_and_of_the_live_hour_add_up_to_the_rows(self) -> None:
        for hours_ago in (0.1, 0.2, 3, 3.5, 30):
            self.row(hours_ago)
        self.row(5, status=UsageLog.Status.ERROR, images_returned=0, cost_micros=0)
        usage_rollup(NOW)
        start = datetime(2026, 11, 18, tzinfo=UTC)
        self.assertEqual(sum(by_hour(start, NOW).values(), Totals()),
                         Totals(requests=6, errors=1, pending=0, images=5, cost_micros=200_000))
        # The rows of the hour now running are read as they are, not from totals.
        self.assertFalse(UsageHour.objects.filter(hour__gte=int(at(0.5).timestamp()) // HOUR * HOUR).exists())
        self.assertEqual(by_dimension("model", start, NOW)["gpt-image-2"].requests, 6)

    def test_adding_up_again_counts_nothing_twice(self) -> None:
        self.row(3)
        usage_rollup(NOW)
        usage_rollup(NOW)
        usage_rollup(NOW + timedelta(minutes=20))
        for dimension in ("all", "model", "channel_id", "token_id", "group_id"):  # once in each
            self.assertEqual(sum(UsageHour.objects.filter(dimension=dimension).values_list("requests", flat=True)), 1)
        self.assertEqual(sum(by_hour(at(24), NOW + timedelta(minutes=20)).values(), Totals()).requests, 1)

    def test_an_hour_with_pending_rows_is_added_up_again_once_they_end(self) -> None:
        job = self.row(4, status=UsageLog.Status.PENDING, images_returned=0, cost_micros=0)
        usage_rollup(NOW)
        hour = int(at(4).timestamp()) // HOUR * HOUR
        self.assertEqual(RolledHour.objects.get(hour=hour).pending, 1)
        UsageLog.objects.filter(pk=job.pk).update(status=UsageLog.Status.SUCCESS, images_returned=2,
                                                  cost_micros=80_000)
        usage_rollup(NOW)
        self.assertEqual(RolledHour.objects.get(hour=hour).pending, 0)
        totals = by_hour(datetime.fromtimestamp(hour, UTC), NOW)[hour]
        self.assertEqual((totals.pending, totals.images, totals.cost_micros), (0, 2, 80_000))

    def test_an_hour_is_added_up_only_once_it_has_settled(self) -> None:
        last_hour_end = int(NOW.timestamp()) // HOUR * HOUR
        self.row(0.6)  # in the hour that ended 30 minutes ago
        usage_rollup(datetime.fromtimestamp(last_hour_end + SETTLE - 1, UTC))
        self.assertFalse(RolledHour.objects.filter(hour=last_hour_end - HOUR).exists())
        usage_rollup(datetime.fromtimestamp(last_hour_end + SETTLE, UTC))
        self.assertEqual(UsageHour.objects.get(hour=last_hour_end - HOUR, dimension="all").requests, 1)

    def test_a_deleted_channel_keeps_its_totals(self) -> None:
        self.row(3)
        usage_rollup(NOW)
        channel_id = self.channel.pk
        self.channel.delete()
        totals = by_dimension("channel_id", datetime(2026, 11, 19, tzinfo=UTC), NOW)
        self.assertEqual(totals[channel_id].requests, 1)

    def test_each_breakdown_adds_up_to_the_whole_and_keeps_rows_of_no_group_apart(self) -> None:
        from gateway.models import TokenGroup

        group = TokenGroup.objects.create(name="agency")
        for hours_ago in (0.2, 3, 7):
            self.row(hours_ago)
            self.row(hours_ago, model="seedream-4.0", group=group, cost_micros=30_000)
        self.row(5, channel=None, token=None, status=UsageLog.Status.ERROR, images_returned=0, cost_micros=0)
        usage_rollup(NOW)
        start = datetime(2026, 11, 19, tzinfo=UTC)
        whole = sum(by_hour(start, NOW).values(), Totals())
        self.assertEqual((whole.requests, whole.cost_micros), (7, 210_000))
        groups = by_dimension("group_id", start, NOW)
        self.assertEqual({k: (t.requests, t.cost_micros) for k, t in groups.items()},
                         {group.pk: (3, 90_000), None: (4, 120_000)})
        self.assertEqual(set(by_dimension("model", start, NOW)), {"gpt-image-2", "seedream-4.0"})
        channels = by_dimension("channel_id", start, NOW)
        self.assertEqual((channels[self.channel.pk].requests, channels[None].errors), (6, 1))
        for dimension in ("model", "channel_id", "token_id", "group_id"):
            self.assertEqual(sum(by_dimension(dimension, start, NOW).values(), Totals()), whole, dimension)
