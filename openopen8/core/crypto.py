"""Secrets at rest: provider keys are stored encrypted (Fernet: AES-128-CBC with an HMAC), readable with any of
``settings.OPENOPEN8_ENCRYPTION_KEYS`` and written with the first, so a key is rotated by listing the new one first
and the old one after it until ``manage.py reencryptkeys`` has rewritten every row with the new one."""

from __future__ import annotations

import base64
import hashlib
from functools import cache
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

PREFIX = "fernet:"  # a stored value without it is plaintext from before encryption (the migration encrypts those)


def derived_key(secret_key: str) -> str:
    """The encryption key used when none is configured: derived from the secret key, so a fresh install is
    encrypted without another setting to keep."""
    digest = hashlib.sha256(f"openopen8 secrets at rest\0{secret_key}".encode()).digest()
    return base64.urlsafe_b64encode(digest).decode()


@cache
def _fernet() -> MultiFernet:
    keys = settings.OPENOPEN8_ENCRYPTION_KEYS or [derived_key(settings.SECRET_KEY)]
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except ValueError:
        raise ImproperlyConfigured("OPENOPEN8_ENCRYPTION_KEY: each key must be 32 url-safe base64-encoded bytes "
                                   "(cryptography's Fernet.generate_key()).") from None


def crypto_reset() -> None:
    """Forget the keys (tests that change them)."""
    _fernet.cache_clear()


def encrypt(text: str) -> str:
    return PREFIX + _fernet().encrypt(text.encode()).decode() if text else ""


def decrypt(stored: str) -> str:
    if not stored.startswith(PREFIX):
        return stored
    try:
        return _fernet().decrypt(stored.removeprefix(PREFIX).encode()).decode()
    except InvalidToken:
        raise ImproperlyConfigured(
            "A stored provider key cannot be decrypted with OPENOPEN8_ENCRYPTION_KEY: was the key (or, without one, "
            "OPENOPEN8_SECRET_KEY) changed? Put the old key after the new one to read what it encrypted.") from None


class EncryptedTextField(models.TextField):  # type: ignore[type-arg]
    """A text column stored encrypted; Python code sees the plaintext. Not searchable or filterable by value."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return decrypt(value) if isinstance(value, str) else value

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        return encrypt(value) if isinstance(value, str) else value
