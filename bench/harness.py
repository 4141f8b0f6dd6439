"""What ``make bench`` stands on: free ports, the processes it starts and stops (nginx as the provider, gateways),
their memory and CPU read from /proc, wrk runs, and a gateway's environment and channels."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
PY = sys.executable
DB_URL = os.environ.get("BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/openopen8_bench")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/5")
WORKERS = os.environ.get("OPENOPEN8_WORKERS", "2")
WORKER_CLASS = os.environ.get("OPENOPEN8_WORKER_CLASS", "gevent")
THREADS = os.environ.get("OPENOPEN8_THREADS", "256")
CONNECTIONS = os.environ.get("OPENOPEN8_WORKER_CONNECTIONS", "1000")
SECONDS = int(os.environ.get("BENCH_SECONDS", "15"))
LONG = max(SECONDS, 30)  # the 500-client runs: each client makes one request a second
# BENCH_QUICK=1: only the rows at 1 and 32 connections (both gateways) and the floor, for trying a change.
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
TINY_PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
work = Path(tempfile.mkdtemp(prefix="oo8-bench-"))
procs: list[subprocess.Popen[bytes]] = []


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(port_: int) -> None:
    for _ in range(300):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port_)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port_}")


# What every process is started with: this one's environment, less a database or Redis it might point at.
BASE_ENV = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}


def start(cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, env={**BASE_ENV, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=open(work / "stderr.log", "ab"), start_new_session=True)
    procs.append(proc)
    return proc


def stop_all() -> None:
    for proc in reversed(procs):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def nginx(port_: int, slow_port: int) -> None:
    """Both near-free providers: one answering at once, one after 1 s (an nginx timer, no process of its own)."""
    body = json.dumps({"created": 1700000000, "data": [{"b64_json": TINY_PNG}]})
    conf = work / "nginx.conf"
    conf.write_text(f"""
load_module {ECHO_MODULE};
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_max_body_size 64m;
  client_body_temp_path {work}/nginx-body;
  proxy_temp_path {work}/nginx-proxy;
  fastcgi_temp_path {work}/nginx-fcgi;
  uwsgi_temp_path {work}/nginx-uwsgi;
  scgi_temp_path {work}/nginx-scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port_} backlog=4096;
    location / {{ default_type application/json; return 200 '{body}'; }}
  }}
  server {{
    listen 127.0.0.1:{slow_port} backlog=4096;
    location / {{ default_type application/json; echo_sleep 1.0; echo -n '{body}'; }}
  }}
}}
""")
    start(["nginx", "-c", str(conf), "-p", str(work), "-g", "daemon off;"])
    wait_for(port_)
    wait_for(slow_port)


def manage(*args: str, env: dict[str, str]) -> str:
    return subprocess.run([PY, "manage.py", *args], cwd=ROOT, env={**BASE_ENV, **env}, check=True,
                          capture_output=True, text=True).stdout


def fresh_database() -> None:
    name = DB_URL.rsplit("/", 1)[1]
    with psycopg.connect(DB_URL.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')


def gateway_processes(master: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout
    return [master, *[int(p) for p in out.split()]]


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def postgres_processes() -> list[int]:
    out = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


class Sampler:
    def __init__(self, master: int) -> None:
        self.master, self.peak, self._stop = master, 0.0, threading.Event()

    def __enter__(self) -> Sampler:
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb(gateway_processes(self.master)))
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


def wrk(url: str, *, connections: int, seconds: int = SECONDS, threads: int = 2, **env: str) -> dict[str, float]:
    out = subprocess.run(["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "--timeout", "30s", "-s", str(BENCH / "request.lua"), url], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = json.loads(re.search(r"RESULT (\{.*\})", out).group(1))  # type: ignore[union-attr]
    result["rps"] = result["requests"] / result["seconds"]
    return result


def body(model: str) -> str:
    return json.dumps({"model": model, "prompt": "a lighthouse at dawn", "response_format": "b64_json"})


def gateway_env(port_: int, **env: str) -> dict[str, str]:
    """A gateway's environment: its production settings on ``port_``, and what ``env`` adds (its database)."""
    return {"OPENOPEN8_DEBUG": "false", "OPENOPEN8_SECRET_KEY": "bench-only-secret-key-0123456789abcdef",
            "OPENOPEN8_BIND": f"127.0.0.1:{port_}", "OPENOPEN8_WORKERS": WORKERS, "OPENOPEN8_THREADS": THREADS,
            "OPENOPEN8_WORKER_CLASS": WORKER_CLASS, "OPENOPEN8_WORKER_CONNECTIONS": CONNECTIONS,
            "OPENOPEN8_ACCESS_LOG": "", "OPENOPEN8_LOG_LEVEL": "WARNING", **env}


def configure(env: dict[str, str], *, fast: int, slow: int, big: int,
              streams: tuple[int, int] = (0, 0)) -> tuple[str, str]:
    """Migrate the gateway's database and give it the bench's channels and price; return a key without a budget and
    one with."""
    manage("migrate", "-v0", env=env)
    key = manage("createtoken", "bench", env=env).strip().splitlines()[-1]
    # A key with a budget holds each request's price before the provider is called: measured apart, at one connection.
    budget_key = manage("createtoken", "bench-budget", "--budget", "1000000", env=env).strip().splitlines()[-1]
    for name, url, models in (("fast", f"http://127.0.0.1:{fast}/v1", "bench-fast,gpt-image-1.5"),
                              ("slow", f"http://127.0.0.1:{slow}/v1", "bench-slow"),
                              ("big", f"http://127.0.0.1:{big}/v1", "bench-big"),
                              ("stream", f"http://127.0.0.1:{streams[0]}/v1", "bench-stream"),
                              ("stream-big", f"http://127.0.0.1:{streams[1]}/v1", "bench-stream-big")):
        manage("addchannel", name, "--type", "openai", "--base-url", url, "--key", "sk-bench-provider-key",
               "--models", models, env=env)
    # Image jobs behind the 1 s provider, on a channel that allows 50 in flight.
    manage("addchannel", "jobs", "--type", "openai", "--base-url", f"http://127.0.0.1:{slow}/v1", "--key",
           "sk-bench-provider-key", "--models", "bench-jobs", env=env)
    manage("shell", "-c", "from channels.models import Channel; Channel.objects.filter(name='jobs')"
           ".update(max_in_flight=50)", env=env)
    manage("shell", "-c", "from gateway.models import Price; Price.objects.create(model='bench-fast', "
                          "usd_per_image='0.01')", env=env)
    return key, budget_key
