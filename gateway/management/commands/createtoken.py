from __future__ import annotations

from datetime import UTC, datetime, time
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway.models import to_micros
from gateway.services import token_create


class Command(BaseCommand):
    help = "Create an API token. The key is printed alone on the last line and is never shown again."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--budget", help="budget in USD (default: unlimited)")
        parser.add_argument("--models", default="", help="comma-separated models the token may use (default: all)")
        parser.add_argument("--expires", help="last day the token works, YYYY-MM-DD (UTC)")

    def handle(self, *args: Any, **opts: Any) -> None:
        budget = None
        if opts["budget"] is not None:
            try:
                budget = Decimal(opts["budget"])
            except InvalidOperation:
                raise CommandError(f"--budget must be an amount in USD, not {opts['budget']!r}") from None
            if budget < 0:
                raise CommandError("--budget cannot be negative")
        expires = None
        if opts["expires"]:
            try:
                day = datetime.strptime(opts["expires"], "%Y-%m-%d").date()
            except ValueError:
                raise CommandError(f"--expires must be YYYY-MM-DD, not {opts['expires']!r}") from None
            expires = datetime.combine(day, time.max, tzinfo=UTC)
        token, key = token_create(name=opts["name"], budget_micros=None if budget is None else to_micros(budget),
                                  allowed_models=opts["models"], expires_at=expires)
        self.stderr.write(f"Created token {token.pk} ({token.name}). Its key, shown only now:")
        self.stdout.write(key)
