from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from gateway.journal import journal_replay
from gateway.services import jobs_sweep
from gateway.sweeper import usage_sweep


class Command(BaseCommand):
    help = ("Write the usage rows this node's journal holds for stopped workers, then mark requests abandoned by a "
            "dead worker as failed and refund their budget holds, and take over image jobs whose runner stopped.")

    def handle(self, *args: Any, **opts: Any) -> None:
        if journal_replay():
            raise CommandError("The database did not answer; the journal is kept. Nothing was swept.")
        self.stdout.write(f"Swept {usage_sweep()} abandoned request(s).")
        self.stdout.write(f"Took over {jobs_sweep()} image job(s) whose runner stopped.")
