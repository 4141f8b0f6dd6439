from __future__ import annotations

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from channels.adapters import ADAPTERS
from channels.models import ALL_ENDPOINTS, Channel


class Command(BaseCommand):
    help = "Add an upstream channel and print its id."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--type", required=True, choices=sorted(ADAPTERS), dest="kind")
        parser.add_argument("--base-url", default="")
        parser.add_argument("--key", default="", help="the provider's API key (sd-webui: user:password)")
        parser.add_argument("--models", required=True, help="comma-separated model names clients may ask for")
        parser.add_argument("--endpoints", default=ALL_ENDPOINTS,
                            help="what the channel serves, comma-separated (default: %(default)s)")
        parser.add_argument("--priority", type=int, default=0)
        parser.add_argument("--weight", type=int, default=1)
        parser.add_argument("--timeout", type=float, help="seconds to wait for the provider")
        parser.add_argument("--map", action="append", default=[], metavar="CLIENT=PROVIDER",
                            help="map a client model name to the provider's (repeatable)")
        parser.add_argument("--config", default="{}", help="per-type config as a JSON object")

    def handle(self, *args: Any, **opts: Any) -> None:
        model_map = {}
        for pair in opts["map"]:
            client, sep, provider = pair.partition("=")
            if not sep or not client.strip() or not provider.strip():
                raise CommandError(f"--map takes CLIENT=PROVIDER, not {pair!r}")
            model_map[client.strip()] = provider.strip()
        try:
            config = json.loads(opts["config"])
        except ValueError as e:
            raise CommandError(f"--config is not valid JSON: {e}") from None
        channel = Channel(name=opts["name"], kind=opts["kind"], base_url=opts["base_url"], api_key=opts["key"],
                          served_models=opts["models"], model_map=model_map, endpoints=opts["endpoints"],
                          priority=opts["priority"],
                          weight=opts["weight"], timeout=opts["timeout"], config=config)
        try:
            channel.full_clean()
        except ValidationError as e:
            problems = "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in e.message_dict.items())
            raise CommandError(f"channel not saved: {problems}") from None
        channel.save()
        self.stdout.write(str(channel.pk))
