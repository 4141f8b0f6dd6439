"""Whether the database answers, asked so that readiness says so within about a second: on PostgreSQL a
connection is taken from the pool with a short timeout, where a request would wait the pool's full timeout."""

from __future__ import annotations

from django.db import connection

READY_TIMEOUT_S = 0.8


def database_status(timeout: float = READY_TIMEOUT_S) -> str:
    """``ok``, or ``error: <kind>``."""
    pool = getattr(connection, "pool", None)
    try:
        if connection.vendor == "postgresql" and pool is not None:
            with pool.connection(timeout=timeout) as conn:
                conn.execute("SELECT 1")
        else:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
    except Exception as error:  # any driver or pool error means not ready
        return f"error: {type(error).__name__}"
    return "ok"
