"""Real processes for tests: gateway nodes on their own ports, and a local S3-compatible server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from django.db import connection

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def database_url() -> str:
    """The URL of the database this test run uses (the test database), for other processes to share."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{db['NAME']}"
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


def _wait_until_up(url: str, proc: subprocess.Popen[Any]) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise AssertionError(f"the process for {url} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or no worker booted yet
            time.sleep(0.05)
    raise AssertionError(f"nothing answered at {url}")


def start(cmd: list[str], *, url: str, env: dict[str, str], cleanup: Callable[..., None],
          log: Path | str | None = None) -> subprocess.Popen[Any]:
    """Start ``cmd`` and wait until ``url`` answers; its output goes to ``log`` (appended), or nowhere."""
    if log is None:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    else:
        with open(log, "ab") as out:  # the child keeps its own copy
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=out)
    cleanup(proc.wait, 10)
    cleanup(proc.terminate)
    _wait_until_up(url, proc)
    return proc


def start_gateway(cleanup: Callable[..., None], *, log: Path | str | None = None, **env: str) -> str:
    """A gateway node as operators run it, gunicorn with gunicorn.conf.py (one worker unless ``env`` says), on a free
    port, sharing this run's database; returns its URL. Its log goes to ``log``, if given."""
    return gateway_process(cleanup, log=log, **env)[0]


def gateway_process(cleanup: Callable[..., None], *, log: Path | str | None = None, data: str | None = None,
                    **env: str) -> tuple[str, subprocess.Popen[Any]]:
    """``start_gateway``, returning gunicorn's master process too; its log goes to ``log``, if given, and its data
    to ``data`` (a new folder unless given)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = data or tempfile.mkdtemp()
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    proc = start([gunicorn, "-c", "gunicorn.conf.py", "openopen8.wsgi:application"],
                 url=f"{base}/healthz", cleanup=cleanup, log=log,
                 env={"DATABASE_URL": database_url(), "OPENOPEN8_DATA_DIR": data, "OPENOPEN8_BIND": f"127.0.0.1:{port}",
                      "PROMETHEUS_MULTIPROC_DIR": str(Path(data) / "prometheus"), "OPENOPEN8_ACCESS_LOG": "",
                      "OPENOPEN8_WORKERS": "1", **env})
    return base, proc


def start_s3(cleanup: Callable[..., None]) -> str:
    """moto's S3-compatible server on a free port; returns its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], url=url, env={},
          cleanup=cleanup)
    return url


def workers_of(master: subprocess.Popen[Any]) -> list[int]:
    """The pids of a gunicorn master's workers."""
    out = subprocess.run(["pgrep", "-P", str(master.pid)], capture_output=True, text=True, check=False).stdout
    return [int(pid) for pid in out.split()]


class MachinePostgres:
    """The machine's PostgreSQL cluster (the suite's database), stopped and started by a test; a test that stops it
    registers ``start`` as a cleanup, so it is running again whatever the test does."""

    def __init__(self) -> None:
        versions = sorted(Path("/etc/postgresql").iterdir()) if Path("/etc/postgresql").is_dir() else []
        self.version = versions[-1].name if versions else ""

    def available(self) -> bool:
        return bool(self.version) and connection.vendor == "postgresql" and connection.settings_dict["HOST"] in (
            "127.0.0.1", "localhost")

    def _ctl(self, *args: str) -> None:
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", self.version, "main", *args], check=True,
                       capture_output=True, timeout=60)

    def stop(self, mode: str = "immediate") -> None:
        """Stop it: ``immediate`` is a crash (no checkpoint, what was not flushed is gone), ``fast`` a clean stop."""
        connection.close()
        self._ctl("stop", "-m", mode)

    def start(self) -> None:
        if subprocess.run(["pg_ctlcluster", self.version, "main", "status"], capture_output=True,
                          check=False).returncode == 0:
            return
        self._ctl("start")
        pool = getattr(connection, "pool", None)
        if pool is not None:
            pool.check()  # this process's idle connections died with the server
        connection.close()


def start_redis(cleanup: Callable[..., None], port: int | None = None) -> tuple[str, subprocess.Popen[Any]]:
    """A Redis server of the test's own on a free port (or ``port``), keeping nothing on disk; returns its URL."""
    port = port or free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cleanup(proc.wait, 10)
    cleanup(proc.terminate)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.02)
    return f"redis://127.0.0.1:{port}/0", proc
