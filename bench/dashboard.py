"""``bench/dashboard.py``: the console's dashboard over a year of usage at 10,000 requests a day (3.65 M rows).

Fills a fresh database (SQLite in a temporary data dir, then PostgreSQL at BENCH_DATABASE_URL's server, in a database
of its own) with a year of rows across models, channels, tokens and groups, then times, as an operator's browser
asks it: the first view of each range (which adds up the last 35 days' hours first, as a new install or an upgrade
does), the views after it, a sweeper's turn with a new hour to add up, and a breakdown's CSV export. Prints a table.
``BENCH_DASHBOARD_DAYS`` / ``BENCH_DASHBOARD_PER_DAY`` change the size; ``BENCH_DASHBOARD_ONLY=sqlite|postgresql``
runs one database.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DAYS = int(os.environ.get("BENCH_DASHBOARD_DAYS", "365"))
PER_DAY = int(os.environ.get("BENCH_DASHBOARD_PER_DAY", "10000"))
PG_SERVER = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/openopen8_bench").rsplit("/", 1)[0]
PG_URL = f"{PG_SERVER}/openopen8_dashboard_bench"
VIEWS = 7  # timed views of each range once warm


def child() -> None:
    """In a process of its own (settings are read once): fill the database, time the dashboard, print one JSON."""
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "openopen8.settings")
    sys.path.insert(0, str(ROOT))
    django.setup()
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from gateway.models import UsageLog
    from gateway.rollup import usage_rollup

    call_command("migrate", verbosity=0)
    started = time.monotonic()
    rows = _fill(UsageLog, timezone.now())
    filled = time.monotonic() - started
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    operator = User.objects.create_superuser("bench", "bench@example.com", "pw")
    client = Client()
    client.force_login(operator)

    def view(path: str) -> float:
        began = time.monotonic()
        r = client.get(path)
        assert r.status_code == 200, r.status_code
        return (time.monotonic() - began) * 1000

    import gateway.rollup

    chunks: list[float] = []
    roll = gateway.rollup._roll

    def timed_roll(first: int, last: int) -> None:
        began = time.monotonic()
        roll(first, last)
        chunks.append((time.monotonic() - began) * 1000)

    gateway.rollup._roll = timed_roll
    result: dict[str, object] = {"vendor": connection.vendor, "rows": rows, "fill_s": round(filled, 1)}
    result["first_view_ms"] = view("/admin/dashboard/?range=month")  # the 35-day backfill, then the page
    result["chunk_max_ms"] = max(chunks)
    result["chunks"] = len(chunks)
    for name in ("day", "week", "month"):
        times = [view(f"/admin/dashboard/?range={name}") for _ in range(VIEWS)]
        result[f"{name}_p50_ms"] = statistics.median(times)
        result[f"{name}_max_ms"] = max(times)
    result["export_ms"] = view("/admin/dashboard/?range=month&export=token")
    # The usage list's CSV export of every row, read as a browser downloads it: its time and what it adds to the
    # process's memory at most while it streams.
    before = _rss_mb()
    began, peak, lines, size = time.monotonic(), before, 0, 0
    response = client.get("/admin/gateway/usagelog/export/")
    for part in response.streaming_content:  # type: ignore[attr-defined]
        lines += 1
        size += len(part)
        if lines % 50_000 == 0:
            peak = max(peak, _rss_mb())
    result["usage_export_s"] = time.monotonic() - began
    result["usage_export_rows"] = lines - 1
    result["usage_export_mb"] = size / 1e6
    result["usage_export_rss_mb"] = max(peak, _rss_mb()) - before
    # A sweeper's turn once the newest hour has settled: one hour to add up (the marks of the newest one undone).
    from gateway.models import RolledHour

    newest = RolledHour.objects.order_by("-hour").first()
    assert newest is not None
    newest.delete()
    began = time.monotonic()
    added = usage_rollup(timezone.now())
    result["sweep_turn_ms"] = (time.monotonic() - began) * 1000
    result["sweep_hours"] = added
    began = time.monotonic()
    usage_rollup(timezone.now())
    result["idle_sweep_ms"] = (time.monotonic() - began) * 1000
    print("RESULT " + json.dumps(result))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _fill(model: type, now: datetime) -> int:
    """A year of rows over 8 models, 12 channels, 200 tokens and 10 groups, written a chunk a statement (COPY on
    PostgreSQL)."""
    from django.db import connection, transaction

    from channels.models import Channel
    from gateway.models import ApiToken, TokenGroup
    from gateway.services import token_create

    rng = random.Random(24)
    models = ["gpt-image-2", "gpt-image-2.5-mini", "gpt-image-1.5", "seedream-4.0", "qwen-image", "flux-dev",
              "dall-e-3", "imagen-4"]
    channels = [Channel.objects.create(name=f"channel-{i}", kind="openai", served_models="*").pk for i in range(12)]
    groups = [TokenGroup.objects.create(name=f"group-{i}", budget_micros=10**9).pk for i in range(10)]
    tokens = []
    for i in range(200):
        made, _key = token_create(name=f"token-{i}", budget_micros=10**8 if i % 3 == 0 else None)
        if i % 2:
            ApiToken.objects.filter(pk=made.pk).update(group_id=groups[i % 10])
        tokens.append((made.pk, groups[i % 10] if i % 2 else None))
    fields = [f for f in model._meta.concrete_fields if not f.primary_key]  # type: ignore[attr-defined]
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)  # type: ignore[attr-defined]
    base = {f.attname: json.dumps(f.get_default()) if f.get_internal_type() == "JSONField" else f.get_default()
            for f in fields}
    total, step = DAYS * PER_DAY, 86400 / PER_DAY
    chunk: list[tuple[Any, ...]] = []

    def flush() -> None:
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor, cursor.connection.cursor().copy(
                    f"COPY {table} ({columns}) FROM STDIN") as copy:
                for values in chunk:
                    copy.write_row(values)
        else:
            marks = ", ".join(["%s"] * len(fields))
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.executemany(f"INSERT INTO {table} ({columns}) VALUES ({marks})", chunk)
        chunk.clear()

    for i in range(total):
        error = rng.random() < 0.05
        token, group = rng.choice(tokens)
        at = now - timedelta(seconds=(total - i) * step)
        row = {**base, "request_id": f"req_{i:012d}", "created_at": at, "completed_at": at, "endpoint": "generations",
               "model": rng.choice(models), "channel_id": rng.choice(channels), "token_id": token,
               "group_id": group, "status": "error" if error else "success", "http_status": 502 if error else 200,
               "error_code": "upstream_error" if error else "", "images_returned": 0 if error else 1,
               "cost_micros": 0 if error else rng.choice((34_000, 42_000, 167_000)),
               "latency_ms": rng.randint(900, 90_000)}
        chunk.append(tuple(row[f.attname] for f in fields))
        if len(chunk) >= 20_000:
            flush()
    if chunk:
        flush()
    return total


def run(vendor: str) -> dict[str, object]:
    env = {**os.environ, "OPENOPEN8_DEBUG": "false", "OPENOPEN8_SECRET_KEY": "bench-dashboard-secret-key-0123456789",
           "OPENOPEN8_ALLOWED_HOSTS": "testserver"}
    env.pop("REDIS_URL", None)
    data = tempfile.mkdtemp(prefix="oo8-dashboard-bench-")
    env["OPENOPEN8_DATA_DIR"] = data
    if vendor == "postgresql":
        import psycopg

        with psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True) as conn:
            conn.execute('DROP DATABASE IF EXISTS "openopen8_dashboard_bench" WITH (FORCE)')
            conn.execute('CREATE DATABASE "openopen8_dashboard_bench"')
        env["DATABASE_URL"] = PG_URL
    else:
        env.pop("DATABASE_URL", None)
    out = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=ROOT, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"the {vendor} run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return dict(json.loads(line[len("RESULT "):]))


def main() -> None:
    only = os.environ.get("BENCH_DASHBOARD_ONLY")
    results = [run(v) for v in ("sqlite", "postgresql") if not only or only == v]
    print(f"dashboard over {DAYS} days at {PER_DAY:,} requests a day")
    print("| measurement | " + " | ".join(r["vendor"] for r in results) + " |")  # type: ignore[misc]
    print("|---|" + "---|" * len(results))
    for key, label in (("rows", "usage rows"), ("fill_s", "filled in (s)"),
                       ("first_view_ms", "first view, 35 days added up first (ms)"),
                       ("chunks", "transactions of that backfill"), ("chunk_max_ms", "longest of them (ms)"),
                       ("day_p50_ms", "last 24 hours, p50 (ms)"), ("week_p50_ms", "last 7 days, p50 (ms)"),
                       ("month_p50_ms", "last 30 days, p50 (ms)"), ("month_max_ms", "last 30 days, slowest (ms)"),
                       ("export_ms", "CSV export by token, 30 days (ms)"),
                       ("usage_export_rows", "usage list's CSV export: rows"),
                       ("usage_export_mb", "its size (MB)"), ("usage_export_s", "its time (s)"),
                       ("usage_export_rss_mb", "memory it added at most (MB of RSS)"),
                       ("sweep_turn_ms", "sweeper's turn adding up one hour (ms)"),
                       ("idle_sweep_ms", "sweeper's turn with nothing to add (ms)")):
        cells = [f"{r[key]:,.1f}" if isinstance(r[key], float) else f"{r[key]:,}" for r in results]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    child() if sys.argv[1:] == ["--child"] else main()
