"""gunicorn settings for OpenOpen8 (``gunicorn -c gunicorn.conf.py openopen8.wsgi:application``).

Image providers take 10-60 s per request, and a request spends nearly all of that waiting on the network. Threaded
workers (gthread) let one process hold many such requests at once: a slow image holds one thread, not a worker.
Each knob can be set from the environment.
"""

from __future__ import annotations

import multiprocessing
import os

bind = os.environ.get("OPENOPEN8_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("OPENOPEN8_WORKERS", multiprocessing.cpu_count()))
threads = int(os.environ.get("OPENOPEN8_THREADS", 64))
# A worker is only killed when its main loop stops answering, not for a long request on a thread; this bounds how
# long a stuck worker lives, above the longest provider wait (OPENOPEN8_UPSTREAM_TIMEOUT, 120 s by default).
timeout = int(os.environ.get("OPENOPEN8_WORKER_TIMEOUT", 180))
graceful_timeout = int(os.environ.get("OPENOPEN8_GRACEFUL_TIMEOUT", 130))
keepalive = 5
# Bound the request line and headers; bodies are bounded by Django's upload settings.
limit_request_line = 8190
accesslog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms'
errorlog = "-"
