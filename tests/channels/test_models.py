"""The Channel model: a type is checked against the adapter registry, and a new provider needs no migration."""

from __future__ import annotations

from io import StringIO
from unittest import mock

from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.test import TestCase

from channels.adapters import ADAPTERS
from channels.models import Channel


class ChannelModelTests(TestCase):
    def test_a_type_outside_the_registry_is_refused_by_clean(self) -> None:
        channel = Channel(name="x", kind="no-such-provider", served_models="m")
        with self.assertRaises(ValidationError) as caught:
            channel.full_clean()
        self.assertIn("kind", caught.exception.message_dict)

    def test_a_registered_type_is_named_by_its_label(self) -> None:
        self.assertEqual(Channel(kind="stability").kind_label, "Stability AI")

    def test_registering_a_provider_needs_no_migration(self) -> None:
        # The column keeps no list of types for a migration to change; a type registered later is valid at once.
        self.assertFalse(Channel._meta.get_field("kind").choices)
        extra = {"acme": ("Acme Images", "channels.adapters.openai.OpenAICompatibleAdapter")}
        with mock.patch.dict(ADAPTERS, extra):
            channel = Channel(name="acme", kind="acme", base_url="https://acme.example/v1", served_models="m")
            channel.full_clean()
        call_command("makemigrations", "channels", "--check", "--dry-run", stdout=StringIO())  # exits if one is due
