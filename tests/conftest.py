from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import pytest


@pytest.fixture(autouse=True)
def images_in_tmp(settings: Any, tmp_path: Path) -> Path:
    """Every test hosts its images, and keeps its jobs' input images, in folders of its own."""
    location = tmp_path / "images"
    settings.STORAGES = {**settings.STORAGES, "images": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": location}}, "jobs": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": tmp_path / "jobs"}}}
    return location


@pytest.fixture(scope="session", autouse=True)
def close_stray_connections(django_db_setup: Any, django_db_blocker: Any) -> Any:
    """Live-server request threads close their database connections just after answering; on PostgreSQL one that
    is still closing when the run ends would stop the test database from being dropped."""
    yield
    from django.db import connection

    if connection.vendor == "postgresql":
        with django_db_blocker.unblock(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")


@pytest.fixture(autouse=True)
def fresh_shared_state(settings: Any) -> None:
    """Circuit breakers and limits kept in Redis outlive a test's database rollback: start each test clean."""
    if settings.REDIS_URL:
        from gateway.state import shared_state
        from gateway.state.redis import RedisState

        client = cast(RedisState, shared_state()).redis
        keys = list(client.scan_iter("oo8:*"))
        if keys:
            client.delete(*keys)


@pytest.fixture(autouse=True)
def fresh_process_state() -> None:
    """Per-process memos keyed by database ids: ids repeat once a test's rows are rolled back."""
    from channels.services import attempt_marks_reset
    from gateway.cache import cache_reset

    attempt_marks_reset()
    cache_reset()
