"""The environment, read with typed helpers that fail loudly by name, and the values that both ``settings.py`` and
``gunicorn.conf.py`` need, so that the two never disagree on a variable or its default.

Imports nothing of Django's apps: gunicorn's master reads it before any app is loaded.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

# The checkout: settings, gunicorn.conf.py and a relative OPENOPEN8_DATA_DIR are all taken from here, whichever
# directory a process was started from.
BASE_DIR = Path(__file__).resolve().parent.parent


def env(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def envbool(name: str, default: str) -> bool:
    value = env(name, default).strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, not {value!r}")


def envnumber(name: str, default: str, kind: type[int] | type[float] = int) -> float:
    """A number greater than zero."""
    value = env(name, default)
    try:
        number = kind(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, not {value!r}") from None
    if number <= 0:
        raise ImproperlyConfigured(f"{name} must be greater than zero, not {value!r}")
    return number


def envnumbers(name: str, default: str) -> list[float]:
    """Comma-separated numbers, each greater than zero."""
    values = [v.strip() for v in env(name, default).split(",") if v.strip()]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be numbers separated by commas, not {env(name, default)!r}") from None
    if not numbers or min(numbers) <= 0:
        raise ImproperlyConfigured(f"{name} must be numbers greater than zero, not {env(name, default)!r}")
    return numbers


def envint(name: str, default: str) -> int:
    return int(envnumber(name, default, int))


def envfloat(name: str, default: str) -> float:
    return float(envnumber(name, default, float))


def envsecret(name: str, default: str) -> str:
    """Read NAME, or the contents of the file named by NAME_FILE (for mounted secrets)."""
    path = env(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as e:
            raise ImproperlyConfigured(f"{name}_FILE points to an unreadable file: {e.strerror}") from None
    return env(name, default)


def data_dir() -> Path:
    """OPENOPEN8_DATA_DIR (default: ``data`` in the checkout; a relative path is taken from the checkout), created if
    missing and kept from other users (it holds the database). Raises ``ImproperlyConfigured`` when it cannot be
    created or written to."""
    raw = env("OPENOPEN8_DATA_DIR") or "data"
    path = (BASE_DIR / raw).resolve()
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_mode & 0o077 and path.stat().st_uid == os.getuid():
            path.chmod(0o700)
        with tempfile.TemporaryFile(dir=path):  # root ignores permission bits: only a real write tells
            pass
    except OSError as e:
        raise ImproperlyConfigured(
            f"OPENOPEN8_DATA_DIR {path} is not a writable directory ({e.strerror}): the database, hosted images and "
            "worker state live there. Point OPENOPEN8_DATA_DIR at a directory this user can write.") from None
    return path


# The gunicorn worker model and how many requests a worker holds at once: gunicorn.conf.py runs the workers, and
# settings sizes each worker's connection pools to match.
WORKER_CLASS = env("OPENOPEN8_WORKER_CLASS", "gevent")
THREADS = envint("OPENOPEN8_THREADS", "256")  # requests a gthread worker holds
WORKER_CONNECTIONS = envint("OPENOPEN8_WORKER_CONNECTIONS", "1000")  # requests a gevent worker holds
WORKER_REQUESTS = THREADS if WORKER_CLASS == "gthread" else WORKER_CONNECTIONS
