"""Provider keys at rest (openopen8/core/crypto.py, the channels migration that encrypts them, reencryptkeys)."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module
from io import StringIO

import pytest
from cryptography.fernet import Fernet
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection
from django.test import override_settings

from channels.models import Channel
from openopen8.core.crypto import crypto_reset
from tests.factories import make_channel

pytestmark = pytest.mark.django_db
KEY = "sk-provider-AT-REST-0123456789"


def stored(channel: Channel) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key FROM channels_channel WHERE id = %s", [channel.pk])
        value: str = cursor.fetchone()[0]
    return value


@pytest.fixture(autouse=True)
def fresh_keys() -> Iterator[None]:
    crypto_reset()
    yield
    crypto_reset()


def with_keys(*keys: bytes) -> override_settings:
    crypto_reset()
    return override_settings(OPENOPEN8_ENCRYPTION_KEYS=[k.decode() for k in keys])


def test_a_channel_key_is_stored_encrypted_and_read_back_plain() -> None:
    channel = make_channel(api_key=f"{KEY}\nsk-second-key-987654321")
    raw = stored(channel)
    assert raw.startswith("fernet:") and "AT-REST" not in raw and "987654321" not in raw
    assert Channel.objects.get(pk=channel.pk).keys() == [KEY, "sk-second-key-987654321"]


def test_the_migration_encrypts_keys_written_in_the_plain() -> None:
    channel = make_channel(api_key=KEY)
    with connection.cursor() as cursor:
        cursor.execute("UPDATE channels_channel SET api_key = %s WHERE id = %s", [KEY, channel.pk])
    assert Channel.objects.get(pk=channel.pk).api_key == KEY  # plaintext from before is still read
    import_module("channels.migrations.0006_encrypted_keys").encrypt_keys(apps, None)
    assert stored(channel).startswith("fernet:") and KEY not in stored(channel)
    assert Channel.objects.get(pk=channel.pk).api_key == KEY


def test_a_rotated_key_reads_old_rows_and_reencryptkeys_moves_them_to_the_new_one() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    with with_keys(old):
        channel = make_channel(api_key=KEY)
    with with_keys(new, old):
        assert Channel.objects.get(pk=channel.pk).api_key == KEY
        out = StringIO()
        call_command("reencryptkeys", stdout=out)
        assert "1 channel" in out.getvalue()
    with with_keys(new):
        assert Channel.objects.get(pk=channel.pk).api_key == KEY
    with with_keys(old), pytest.raises(ImproperlyConfigured, match="old key after the new one"):
        Channel.objects.get(pk=channel.pk)


def test_a_malformed_encryption_key_is_refused_by_name() -> None:
    with override_settings(OPENOPEN8_ENCRYPTION_KEYS=["not-a-key"]), pytest.raises(ImproperlyConfigured,
                                                                                  match="OPENOPEN8_ENCRYPTION_KEY"):
        crypto_reset()
        make_channel(api_key=KEY)
