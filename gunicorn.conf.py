"""gunicorn settings for OpenOpen8 (``gunicorn -c gunicorn.conf.py openopen8.wsgi:application``).

Image providers take 10-60 s per request, and a request spends nearly all of that waiting on the network, so a worker
must hold many requests at once. Each knob can be set from the environment.

The worker model was chosen by measurement (bench/RESULTS.md, "Worker model"): gevent workers, where each request is
a greenlet and waiting on a provider, PostgreSQL or Redis yields to the others, served more requests a second with
less CPU a request than threads (no GIL hand-offs between hundreds of them). The code is the same synchronous
Django: gunicorn's gevent worker patches the standard library before the app is loaded, and psycopg and redis-py then
wait cooperatively. The trade-off: a greenlet that computes (decoding a large upload, say) holds its worker until it
is done, where threads would take turns. OPENOPEN8_WORKER_CLASS=gthread (with OPENOPEN8_THREADS) switches back to
threads.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# The checkout, for openopen8.env and the app, whichever directory gunicorn is started from.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from django.core.exceptions import ImproperlyConfigured  # noqa: E402

try:
    from openopen8 import env as oo8  # its worker sizes are read as it loads

    DATA_DIR = oo8.data_dir()
    bind = oo8.env("OPENOPEN8_BIND", "127.0.0.1:8000")
    workers = oo8.envint("OPENOPEN8_WORKERS", str(multiprocessing.cpu_count()))
    # A worker is only killed when its main loop stops answering, not for one long request; this bounds how
    # long a stuck worker lives, above the longest provider wait (OPENOPEN8_UPSTREAM_TIMEOUT, 120 s by default).
    timeout = oo8.envint("OPENOPEN8_WORKER_TIMEOUT", "180")
    graceful_timeout = oo8.envint("OPENOPEN8_GRACEFUL_TIMEOUT", "130")
    malloc_arenas = oo8.envint("OPENOPEN8_MALLOC_ARENAS", "2")
    gc_threshold = oo8.envint("OPENOPEN8_GC_THRESHOLD", "5000")
    writers_drain_timeout = oo8.envfloat("OPENOPEN8_WRITERS_DRAIN_TIMEOUT", "10")
except ImproperlyConfigured as error:
    sys.exit(f"Error: {error}")  # one line naming the variable, not a traceback

chdir = str(oo8.BASE_DIR)
# The same variables and defaults as openopen8/settings.py, which sizes the worker's connection pools from them.
worker_class = oo8.WORKER_CLASS
worker_connections = oo8.WORKER_CONNECTIONS  # requests a gevent worker holds
threads = oo8.THREADS  # requests a gthread worker holds
keepalive = 5
# Bound the request line and headers; bodies are bounded by Django's upload settings.
limit_request_line = 8190
accesslog = oo8.env("OPENOPEN8_ACCESS_LOG", "-") or None
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
# gunicorn's control socket (gunicornc) defaults to one path per user, which a second gateway on the machine would take
# over or remove; each gateway keeps its own beside its data. A Unix socket path has at most 107 bytes: past that, none.
control_socket = str(DATA_DIR / "gunicorn.ctl")
control_socket_disable = len(control_socket.encode()) > 107

# Every worker writes its metrics here and /metrics sums them (prometheus_client's multiprocess mode).
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(DATA_DIR / "prometheus"))


def on_starting(server: Any) -> None:
    # Samples of a previous run's workers must not be summed into this one's.
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)


def post_fork(server: Any, worker: Any) -> None:
    # glibc gives each thread that allocates its own arena; with hundreds of threads (gthread) moving multi-megabyte
    # images that fragments memory badly. Two arenas per worker hold it down at no cost in throughput
    # (bench/RESULTS.md).
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, malloc_arenas)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass  # not glibc


def post_worker_init(worker: Any) -> None:
    from openopen8 import runtime

    runtime.start()
    # With its defaults Python's cyclic collector rescans the objects loading Django made, which live as long as the
    # worker, every 700 new objects, with full collections that hold every request: freeze them, and collect every
    # 5,000 (bench/RESULTS.md).
    gc.freeze()
    gc.set_threshold(gc_threshold, 10, 10)


def worker_exit(server: Any, worker: Any) -> None:
    # A worker stopping gracefully writes the usage rows it still holds.
    from openopen8 import runtime

    runtime.stop(timeout=writers_drain_timeout)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
