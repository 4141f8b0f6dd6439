"""Instructions a generation costs, counted by valgrind's callgrind: unlike wall-clock numbers, the count hardly moves
when the shared machine is slower or busier, so it compares code across runs and days.

``python bench/instructions.py`` (bench/run.py calls it with the gateway's environment, a token in BENCH_KEY and a
channel for ``bench-fast``) runs the count twice under callgrind, with 50 requests and with 250, and prints the
difference per request (about 2.5 minutes). Each run serves the requests in-process through openopen8.wsgi (what
gunicorn serves), with gevent's patching as in a gunicorn worker, against the real PostgreSQL, Redis and provider:
gunicorn's own parsing and writing are not in the count.
"""

from __future__ import annotations

import gc
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "bench-fast", "prompt": "a lighthouse at dawn", "response_format": "b64_json"}).encode()
WARM = 30


def serve(requests: int) -> None:
    """Serve ``WARM`` + ``requests`` generations in this process."""
    from gevent import monkey  # type: ignore[import-untyped]

    monkey.patch_all()
    sys.path.insert(0, str(ROOT))
    from openopen8.wsgi import application as app  # what gunicorn serves

    gc.freeze()  # as gunicorn.conf.py's post_worker_init does in every worker
    gc.set_threshold(int(os.environ.get("OPENOPEN8_GC_THRESHOLD", 5000)), 10, 10)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/images/generations", "SCRIPT_NAME": "", "QUERY_STRING": "",
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8000", "HTTP_HOST": "127.0.0.1:8000",
               "CONTENT_TYPE": "application/json", "CONTENT_LENGTH": str(len(BODY)),
               "HTTP_AUTHORIZATION": f"Bearer {os.environ['BENCH_KEY']}", "wsgi.url_scheme": "http",
               "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
               "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False}
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)

    for _ in range(WARM + requests):
        answer = app({**environ, "wsgi.input": io.BytesIO(BODY)}, start_response)
        b"".join(answer)
        answer.close()
    if any(not s.startswith("200") for s in statuses):
        raise SystemExit(f"a request failed: {next(s for s in statuses if not s.startswith('200'))}")


def counted(requests: int, env: dict[str, str]) -> int:
    """Instructions of a whole process that serves ``requests`` generations after the warm-up, with the gateway's
    environment ``env`` (added to this process's)."""
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
                          "--serve", str(requests)], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, **env, "PYTHONHASHSEED": "0",
                              # The request's own work only, as in every run counted so far: the completion written
                              # within the request, and no sweep (its thread would run once a minute of the count)
                              # nor job runner (it looks for jobs every second).
                              "OPENOPEN8_WRITE_AFTER_ANSWER": "false", "OPENOPEN8_SWEEP_INTERVAL": "86400",
                              "OPENOPEN8_RUN_JOBS": "false"}).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))  # type: ignore[union-attr]


def per_request(*, env: dict[str, str], base: int = 50, extra: int = 200) -> float:
    """Instructions one generation adds: the difference between serving ``base`` and ``base + extra``, over ``extra``
    (startup, imports and the warm-up cancel out)."""
    return (counted(base + extra, env) - counted(base, env)) / extra


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(int(sys.argv[2]))
    else:
        print(f"{per_request(env={}) / 1e6:.2f} M instructions a generation")
