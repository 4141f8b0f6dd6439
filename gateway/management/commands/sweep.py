from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from gateway.sweeper import usage_sweep


class Command(BaseCommand):
    help = "Mark requests abandoned by a dead worker as failed and refund their budget holds."

    def handle(self, *args: Any, **opts: Any) -> None:
        self.stdout.write(f"Swept {usage_sweep()} abandoned request(s).")
