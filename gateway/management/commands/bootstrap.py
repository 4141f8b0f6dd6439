from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from channels.models import Channel
from gateway.models import ApiToken
from gateway.services import token_create


class Command(BaseCommand):
    help = ("On an empty database only: create a demo token and a placeholder channel for dall-e-2 and dall-e-3, "
            "and print the key with a ready-to-paste curl.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="where the gateway will listen")

    def handle(self, *args: Any, **opts: Any) -> None:
        if ApiToken.objects.exists() or Channel.objects.exists():
            self.stdout.write("Existing tokens and channels kept. New key: python manage.py createtoken NAME")
            return
        Channel.objects.create(name="Placeholder (demo)", kind="placeholder", served_models="dall-e-2,dall-e-3",
                               demo=True)
        _token, key = token_create(name="demo")
        url = opts["url"]
        self.stdout.write(f"""
Demo set up: a placeholder channel (it draws the prompt; no real provider) for dall-e-2 and dall-e-3,
and an API token. Its key, shown only now:

    {key}

Try it:

curl {url}/v1/images/generations \\
  -H "Authorization: Bearer {key}" \\
  -H "Content-Type: application/json" \\
  -d '{{"model": "dall-e-3", "prompt": "a lighthouse at dawn", "response_format": "url"}}'

Admin: {url}/admin/ (create a login with: .venv/bin/python manage.py createsuperuser)
""")
