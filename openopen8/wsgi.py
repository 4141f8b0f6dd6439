from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "openopen8.settings")

from django.conf import settings  # noqa: E402

from openopen8.body import body_deadline  # noqa: E402
from openopen8.client import delivery_hooks  # noqa: E402

# A body that does not arrive in time ends its request (and its connection) instead of holding a worker's slot; a
# request may learn whether its answer reached the client.
application = body_deadline(delivery_hooks(get_wsgi_application()), seconds=settings.OPENOPEN8_BODY_TIMEOUT,
                            gevent=settings.OPENOPEN8_WORKER_CLASS == "gevent")

# Whatever server loads the app, the process starts its background work here (gunicorn's post_worker_init asks
# again, which starts it in a worker forked from a master that preloaded the app).
from openopen8 import runtime  # noqa: E402

runtime.start()
