from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "openopen8.settings")

application = get_wsgi_application()

# Whatever server loads the app, the process starts its background work here (gunicorn's post_worker_init asks
# again, which starts it in a worker forked from a master that preloaded the app).
from openopen8 import runtime  # noqa: E402

runtime.start()
