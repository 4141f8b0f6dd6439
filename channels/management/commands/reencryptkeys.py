from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand
from django.db import transaction

from channels.models import Channel


class Command(BaseCommand):
    help = ("Rewrite every channel's keys encrypted with the first OPENOPEN8_ENCRYPTION_KEY (after a rotation: the "
            "old key can then be dropped from the list).")

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            channels = list(Channel.objects.select_for_update().only("pk", "api_key"))
            for channel in channels:  # read with any listed key, written with the first
                channel.save(update_fields=["api_key"])
        self.stdout.write(f"re-encrypted the keys of {len(channels)} channel(s)")
