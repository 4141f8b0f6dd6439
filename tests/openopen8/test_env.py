"""Settings and gunicorn.conf.py read the environment through openopen8/env.py: the same variables, the same defaults,
the same data directory whichever directory a process starts in, and one clear line when something is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "gunicorn.conf.py"


def clean_env(**env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("OPENOPEN8_", "PROMETHEUS_")) and k not in ("DATABASE_URL", "REDIS_URL")}
    return {**clean, "PYTHONPATH": str(ROOT), **env}


def gunicorn_config(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """gunicorn.conf.py evaluated as gunicorn evaluates it, from ``cwd``; prints the settings these tests read."""
    code = ("import json, runpy, sys; c = runpy.run_path(sys.argv[1]); print(json.dumps({k: c[k] for k in "
            "('worker_class', 'threads', 'worker_connections', 'chdir', 'control_socket')} | "
            "{'data_dir': str(c['DATA_DIR'])}))")
    return subprocess.run([sys.executable, "-c", code, str(CONF)], cwd=cwd, text=True, capture_output=True,
                          env=clean_env(**env))


def django_settings(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    code = ("import json, django; from django.conf import settings; django.setup(); print(json.dumps({"
            "'data_dir': str(settings.DATA_DIR), 'database': str(settings.DATABASES['default']['NAME']), "
            "'worker_class': settings.OPENOPEN8_WORKER_CLASS, 'worker_requests': settings.OPENOPEN8_WORKER_REQUESTS}))")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, text=True, capture_output=True,
                          env=clean_env(DJANGO_SETTINGS_MODULE="openopen8.settings", **env))


def values(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr[-2000:]
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def test_the_data_directory_is_the_checkouts_whichever_directory_a_process_starts_in(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (ROOT, elsewhere):
        conf, settings = values(gunicorn_config(cwd)), values(django_settings(cwd))
        assert conf["data_dir"] == settings["data_dir"] == str(ROOT / "data"), cwd
        assert settings["database"] == str(ROOT / "data" / "openopen8.sqlite3")
        assert conf["chdir"] == str(ROOT)  # the app is found from anywhere too
    # A relative OPENOPEN8_DATA_DIR is taken from the checkout too, by both.
    wanted = tmp_path / "relative-data"
    relative = os.path.relpath(wanted, ROOT)
    assert values(gunicorn_config(elsewhere, OPENOPEN8_DATA_DIR=relative))["data_dir"] == str(wanted)
    assert values(django_settings(elsewhere, OPENOPEN8_DATA_DIR=relative))["data_dir"] == str(wanted)


def test_gunicorn_and_settings_size_the_workers_from_the_same_variables(tmp_path: Path) -> None:
    data = str(tmp_path)
    conf, settings = values(gunicorn_config(tmp_path, OPENOPEN8_DATA_DIR=data)), values(django_settings(
        tmp_path, OPENOPEN8_DATA_DIR=data))
    assert (conf["worker_class"], conf["worker_connections"]) == (settings["worker_class"], 1000) == ("gevent", 1000)
    assert settings["worker_requests"] == 1000
    threaded = {"OPENOPEN8_DATA_DIR": data, "OPENOPEN8_WORKER_CLASS": "gthread", "OPENOPEN8_THREADS": "7"}
    conf, settings = values(gunicorn_config(tmp_path, **threaded)), values(django_settings(tmp_path, **threaded))
    assert (conf["worker_class"], conf["threads"]) == ("gthread", 7)
    assert (settings["worker_class"], settings["worker_requests"]) == ("gthread", 7)


def test_a_data_directory_that_cannot_be_written_is_one_clear_error_for_both(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for result in (gunicorn_config(tmp_path, OPENOPEN8_DATA_DIR=str(blocker / "data")),
                   django_settings(tmp_path, OPENOPEN8_DATA_DIR=str(blocker / "data"))):
        assert result.returncode != 0
        assert f"OPENOPEN8_DATA_DIR {blocker / 'data'} is not a writable directory" in result.stderr
    # gunicorn's master says it in one line, not a traceback.
    refused = gunicorn_config(tmp_path, OPENOPEN8_DATA_DIR=str(blocker / "data"))
    assert refused.stderr.strip().startswith("Error: OPENOPEN8_DATA_DIR") and "Traceback" not in refused.stderr


def test_gunicorn_refuses_a_bad_number_by_name(tmp_path: Path) -> None:
    for name in ("OPENOPEN8_WORKERS", "OPENOPEN8_THREADS", "OPENOPEN8_WORKER_TIMEOUT"):
        refused = gunicorn_config(tmp_path, OPENOPEN8_DATA_DIR=str(tmp_path), **{name: "two"})
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.strip() == f"Error: {name} must be a number, not 'two'"


def test_the_data_directory_and_the_sqlite_file_it_creates_are_the_owners_alone(tmp_path: Path) -> None:
    data = tmp_path / "fresh" / "data"
    code = "import django; django.setup(); from django.db import connection; connection.ensure_connection()"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, text=True, capture_output=True,
                            env=clean_env(DJANGO_SETTINGS_MODULE="openopen8.settings", OPENOPEN8_DATA_DIR=str(data)))
    assert result.returncode == 0, result.stderr
    assert (data.stat().st_mode & 0o777, (data / "openopen8.sqlite3").stat().st_mode & 0o777) == (0o700, 0o600)


def test_settings_refuse_an_unknown_time_zone_and_a_bad_webhook_schedule_by_name(tmp_path: Path) -> None:
    for name, value, says in (("OPENOPEN8_TIME_ZONE", "Mars/Olympus", "IANA time zone"),
                              ("OPENOPEN8_WEBHOOK_RETRIES", "5,soon", "numbers separated by commas")):
        refused = django_settings(tmp_path, OPENOPEN8_DATA_DIR=str(tmp_path), **{name: value})
        assert refused.returncode != 0 and f"{name} must be" in refused.stderr and says in refused.stderr
    shanghai = django_settings(tmp_path, OPENOPEN8_DATA_DIR=str(tmp_path), OPENOPEN8_TIME_ZONE="Asia/Shanghai")
    assert shanghai.returncode == 0, shanghai.stderr[-2000:]
