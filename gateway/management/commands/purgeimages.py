from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from gateway.hosting import images_purge


class Command(BaseCommand):
    help = "Delete hosted images whose URLs have expired."

    def handle(self, *args: Any, **opts: Any) -> None:
        self.stdout.write(f"Deleted {images_purge()} expired image(s).")
