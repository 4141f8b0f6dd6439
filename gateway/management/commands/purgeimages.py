from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from gateway.hosting import images_purge
from gateway.idempotency import idempotency_purge


class Command(BaseCommand):
    help = "Delete hosted images whose URLs have expired, and Idempotency-Key answers past keeping."

    def handle(self, *args: Any, **opts: Any) -> None:
        self.stdout.write(f"Deleted {images_purge()} expired image(s).")
        self.stdout.write(f"Deleted {idempotency_purge()} expired Idempotency-Key answer(s).")
