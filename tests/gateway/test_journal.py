"""The journal: completed usage rows kept on local disk while the database does not take them, written once it does,
by their own process or, for a process that is gone, by any other (or ``manage.py sweep``)."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from datetime import timedelta
from io import StringIO
from pathlib import Path
from unittest import mock

from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import OperationalError
from django.test import TransactionTestCase, override_settings
from django.utils import timezone

from gateway.journal import encode, journal_dir, journal_park, journal_parked, journal_replay
from gateway.models import ApiToken, UsageLog
from gateway.usage import usage_body, usage_new
from gateway.usage_sql import usage_insert_holding
from tests.factories import make_token


class JournalTests(TransactionTestCase):
    def setUp(self) -> None:
        data = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, data)
        self.enterContext(override_settings(DATA_DIR=Path(data)))
        # Rows an earlier test left parked belong to that test's journal, not this one's.
        self.enterContext(mock.patch("gateway.journal._own", None))

    def delivered(self, token: ApiToken, request_id: str) -> UsageLog:
        """A request of two images held, one delivered (16,000 µUSD), as its completion leaves it."""
        log = usage_new(token=token, endpoint="generations", request_id=request_id)
        usage_body(log, {"prompt": "a"})
        usage_insert_holding(log, micros=32000)
        log.status, log.http_status, log.images_returned = UsageLog.Status.SUCCESS, 200, 1
        log.cost_micros, log.completed_at, log.reserved_micros = 16000, timezone.now(), 0
        log.attempts = [{"channel": 1, "name": "c", "outcome": "ok", "latency_ms": 5}]
        return log

    def spent(self, token: ApiToken) -> int:
        return ApiToken.objects.get(pk=token.pk).spent_micros

    def test_parked_rows_are_fsynced_to_disk_and_written_once_the_database_answers(self) -> None:
        token, _key = make_token(budget="1.00")
        log = self.delivered(token, "req_parked")
        with self.assertLogs("gateway.usage", "ERROR") as logs:
            journal_park([(log, 32000)], "OperationalError: connection refused")
        self.assertIn("connection refused", logs.output[0])
        files = list(journal_dir().glob("*.jsonl"))
        self.assertEqual(len(files), 1)
        self.assertIn(b'"request_id":"req_parked"', files[0].read_bytes())
        with mock.patch("gateway.journal.usage_finish", side_effect=OperationalError("connection refused")):
            self.assertEqual(journal_replay(), 1)  # still away: kept
        self.assertEqual(UsageLog.objects.get().status, "pending")
        self.assertEqual(journal_replay(), 0)
        row = UsageLog.objects.get()
        self.assertEqual((row.status, row.cost_micros, row.attempts[0]["outcome"]), ("success", 16000, "ok"))
        self.assertEqual(self.spent(token), 16000)
        self.assertEqual((journal_parked(), files[0].read_bytes()), (0, b""))  # nothing left to replay

    def test_a_gone_process_file_is_written_and_removed_and_a_living_one_is_left_alone(self) -> None:
        token, _key = make_token(budget="1.00")
        gone, living = self.delivered(token, "req_gone"), self.delivered(token, "req_living")
        folder = journal_dir()
        folder.mkdir(parents=True)
        # A worker killed in the middle of a write leaves a line cut short.
        (folder / "111-dead.jsonl").write_bytes(encode(gone, 32000) + encode(gone, 32000)[:40])
        (folder / "222-alive.jsonl").write_bytes(encode(living, 32000))
        held = os.open(folder / "222-alive.jsonl", os.O_RDWR)  # its process holds the lock while it lives
        self.addCleanup(os.close, held)
        fcntl.flock(held, fcntl.LOCK_EX)
        with self.assertLogs("gateway.usage", "WARNING") as logs:
            journal_replay()
        self.assertTrue(any("line 2 is not a usage row" in line for line in logs.output))
        self.assertFalse((folder / "111-dead.jsonl").exists())
        self.assertTrue((folder / "222-alive.jsonl").exists())
        rows = dict(UsageLog.objects.values_list("request_id", "status"))
        self.assertEqual(rows, {"req_gone": "success", "req_living": "pending"})
        self.assertEqual(self.spent(token), 16000 + 32000)

    def test_the_sweep_command_writes_the_journal_first_and_sweeps_nothing_while_the_database_is_away(self) -> None:
        token, _key = make_token(budget="1.00")
        log = self.delivered(token, "req_cmd")
        UsageLog.objects.filter(request_id="req_cmd").update(created_at=timezone.now() - timedelta(hours=1))
        log.created_at = UsageLog.objects.get().created_at
        folder = journal_dir()
        folder.mkdir(parents=True)
        (folder / "333-dead.jsonl").write_bytes(encode(log, 32000))
        with mock.patch("gateway.journal.usage_finish", side_effect=OperationalError("connection refused")):
            with self.assertRaisesMessage(CommandError, "journal is kept"):
                call_command("sweep", stdout=StringIO())
        self.assertEqual(UsageLog.objects.get().status, "pending")
        out = StringIO()
        call_command("sweep", stdout=out)
        self.assertIn("Swept 0", out.getvalue())  # answered, so written, not swept and refunded
        self.assertEqual(UsageLog.objects.get().status, "success")
        self.assertEqual(self.spent(token), 16000)
