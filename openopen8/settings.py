"""OpenOpen8 settings: one module, driven by environment variables prefixed ``OPENOPEN8_``.

Every variable has a default that works for a local run with nothing set (SQLite and image files in the checkout's
``data`` directory). The helpers and the values gunicorn.conf.py shares are in openopen8/env.py. With debug off, the
process refuses to start on the development secret key.
"""

from __future__ import annotations

import zoneinfo
from datetime import timedelta

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from openopen8.env import (
    BASE_DIR,
    WORKER_CLASS,
    WORKER_REQUESTS,
    data_dir,
    env,
    envbool,
    envfloat,
    envint,
    envnumbers,
    envsecret,
)

DEV_SECRET_KEY = "openopen8-development-key-not-for-production"

DEBUG = envbool("OPENOPEN8_DEBUG", "true")
SECRET_KEY = envsecret("OPENOPEN8_SECRET_KEY", DEV_SECRET_KEY)
if not DEBUG and SECRET_KEY == DEV_SECRET_KEY:
    raise ImproperlyConfigured(
        "OPENOPEN8_SECRET_KEY is not set: with OPENOPEN8_DEBUG off the development key would make every "
        "API token hash forgeable. Set OPENOPEN8_SECRET_KEY (or OPENOPEN8_SECRET_KEY_FILE) to a long random value."
    )
# Provider keys are stored encrypted with these (comma-separated, newest first), else a key derived from SECRET_KEY.
OPENOPEN8_ENCRYPTION_KEYS = [k.strip() for k in envsecret("OPENOPEN8_ENCRYPTION_KEY", "").split(",") if k.strip()]
ALLOWED_HOSTS = [h.strip() for h in env("OPENOPEN8_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()]

DATA_DIR = data_dir()

# Base of the image URLs the gateway returns; empty means "the scheme and host the client used".
OPENOPEN8_PUBLIC_URL = env("OPENOPEN8_PUBLIC_URL").rstrip("/")
OPENOPEN8_IMAGE_TTL = envint("OPENOPEN8_IMAGE_TTL", "3600")
OPENOPEN8_UPSTREAM_TIMEOUT = envfloat("OPENOPEN8_UPSTREAM_TIMEOUT", "120")
OPENOPEN8_CONNECT_TIMEOUT = envfloat("OPENOPEN8_CONNECT_TIMEOUT", "10")
OPENOPEN8_MAX_ATTEMPTS = envint("OPENOPEN8_MAX_ATTEMPTS", "3")
# The gunicorn worker model and how many requests a worker holds at once (openopen8/env.py, read by gunicorn.conf.py
# too): OPENOPEN8_WORKER_CONNECTIONS greenlets for gevent, the default, or OPENOPEN8_THREADS threads for gthread.
OPENOPEN8_WORKER_CLASS = WORKER_CLASS
OPENOPEN8_WORKER_REQUESTS = WORKER_REQUESTS
# Provider connections a process keeps per provider host, shared by its requests; unset means one per request in
# flight for each parallel call a request may make (channels/http.py::_provider_pool). Beyond it a call gets a
# connection of its own, and urllib3 logs a warning when it closes it.
OPENOPEN8_PROVIDER_POOL_SIZE = (envint("OPENOPEN8_PROVIDER_POOL_SIZE", "1")
                                if env("OPENOPEN8_PROVIDER_POOL_SIZE") else None)
# Largest provider answer (JSON with base64 images) and largest single image downloaded from a provider URL.
OPENOPEN8_MAX_UPSTREAM_BYTES = envint("OPENOPEN8_MAX_UPSTREAM_BYTES", str(200 * 1024 * 1024))
OPENOPEN8_MAX_IMAGE_BYTES = envint("OPENOPEN8_MAX_IMAGE_BYTES", str(50 * 1024 * 1024))
# Uploads: the largest request body, the largest single input image, and the most pixels an image may decode to
# (a decompression-bomb guard).
OPENOPEN8_MAX_REQUEST_BYTES = envint("OPENOPEN8_MAX_REQUEST_BYTES", str(128 * 1024 * 1024))
# Seconds a request body may take to arrive (then 408), and how many bodies one key may have arriving at once per
# worker (then 429), so that slow uploads from one key cannot hold every connection a worker has.
OPENOPEN8_BODY_TIMEOUT = envfloat("OPENOPEN8_BODY_TIMEOUT", "60")
OPENOPEN8_MAX_UPLOADS_PER_KEY = envint("OPENOPEN8_MAX_UPLOADS_PER_KEY", str(max(1, WORKER_REQUESTS // 4)))
OPENOPEN8_MAX_UPLOAD_BYTES = envint("OPENOPEN8_MAX_UPLOAD_BYTES", str(50 * 1024 * 1024))
OPENOPEN8_MAX_IMAGE_PIXELS = envint("OPENOPEN8_MAX_IMAGE_PIXELS", "40000000")
# The pixels of all of one request's input images together (sixteen 2048x2048 images, say).
OPENOPEN8_MAX_REQUEST_PIXELS = envint("OPENOPEN8_MAX_REQUEST_PIXELS", "80000000")
# Image URLs (from clients, or returned by providers) on private, loopback or link-local addresses are refused unless
# this is on: turn it on for a self-hosted provider on a LAN.
# The longest prompt for a model the rules do not know (a rule's own prompt_max wins).
OPENOPEN8_DEFAULT_PROMPT_MAX = envint("OPENOPEN8_DEFAULT_PROMPT_MAX", "32000")
OPENOPEN8_ALLOW_PRIVATE_URLS = envbool("OPENOPEN8_ALLOW_PRIVATE_URLS", "false")
# Circuit breaker: consecutive channel faults that open a channel's circuit, and the first cool-down in seconds
# (doubling on each further trip, up to the maximum).
OPENOPEN8_BREAKER_THRESHOLD = envint("OPENOPEN8_BREAKER_THRESHOLD", "5")
OPENOPEN8_BREAKER_COOLDOWN = envfloat("OPENOPEN8_BREAKER_COOLDOWN", "30")
OPENOPEN8_BREAKER_MAX_COOLDOWN = envfloat("OPENOPEN8_BREAKER_MAX_COOLDOWN", "600")
# Longest a client request may take in all, failovers and downloads included.
OPENOPEN8_REQUEST_DEADLINE = envfloat("OPENOPEN8_REQUEST_DEADLINE", "300")
# A streamed answer sends an SSE comment this often (seconds) while no event is ready, so proxies and CDNs that cut
# silent connections keep it; an error within the first such wait is still answered as a plain JSON error.
OPENOPEN8_STREAM_KEEPALIVE = envfloat("OPENOPEN8_STREAM_KEEPALIVE", "15")
# How long (seconds) an Idempotency-Key's successful answer is kept and repeated to the same key and body.
OPENOPEN8_IDEMPOTENCY_TTL = envfloat("OPENOPEN8_IDEMPOTENCY_TTL", "86400")
# Whether serving processes run image jobs too (off: only `manage.py jobworker` processes do), how many a process
# runs at once, how often an idle runner looks for work (seconds), and how long a job may wait for its channels'
# limits before it fails.
OPENOPEN8_RUN_JOBS = envbool("OPENOPEN8_RUN_JOBS", "true")
OPENOPEN8_JOB_CONCURRENCY = envint("OPENOPEN8_JOB_CONCURRENCY", "32")
OPENOPEN8_JOB_POLL = envfloat("OPENOPEN8_JOB_POLL", "1")
OPENOPEN8_JOB_MAX_WAIT = envfloat("OPENOPEN8_JOB_MAX_WAIT", "3600")
# Seconds between a job webhook's failed delivery and the next try (about a day in all, then it is given up).
OPENOPEN8_WEBHOOK_RETRIES = envnumbers("OPENOPEN8_WEBHOOK_RETRIES", "5,300,1800,7200,18000,36000,21600")
OPENOPEN8_WEBHOOK_TIMEOUT = envfloat("OPENOPEN8_WEBHOOK_TIMEOUT", "15")
# Operator alerts (gateway/alerts.py): a channel the gateway disabled, a circuit that opened, a budget past 80 % or
# 100 %. POSTed as JSON to the webhook URL (signed like job webhooks when a whsec_ secret is set) and mailed to the
# comma-separated addresses when an SMTP host is set; recorded in the console either way.
OPENOPEN8_ALERT_WEBHOOK_URL = env("OPENOPEN8_ALERT_WEBHOOK_URL")
OPENOPEN8_ALERT_WEBHOOK_SECRET = envsecret("OPENOPEN8_ALERT_WEBHOOK_SECRET", "")
OPENOPEN8_ALERT_EMAIL = [a.strip() for a in env("OPENOPEN8_ALERT_EMAIL").split(",") if a.strip()]
EMAIL_HOST = env("OPENOPEN8_EMAIL_HOST")
EMAIL_PORT = envint("OPENOPEN8_EMAIL_PORT", "587")
EMAIL_HOST_USER = env("OPENOPEN8_EMAIL_USER")
EMAIL_HOST_PASSWORD = envsecret("OPENOPEN8_EMAIL_PASSWORD", "")
EMAIL_USE_TLS = envbool("OPENOPEN8_EMAIL_TLS", "true")
EMAIL_TIMEOUT = 15
DEFAULT_FROM_EMAIL = SERVER_EMAIL = env("OPENOPEN8_EMAIL_FROM", "openopen8@localhost")
# A running job's runner renews its heartbeat every third of this; a job whose heartbeat is older is taken as dead.
OPENOPEN8_JOB_LEASE = envfloat("OPENOPEN8_JOB_LEASE", "30")
# How often each worker sweeps abandoned requests (pending rows whose deadline has long passed), in seconds.
OPENOPEN8_SWEEP_INTERVAL = envfloat("OPENOPEN8_SWEEP_INTERVAL", "60")
# How long past the request deadline a pending row is left before the sweeper counts it abandoned (seconds).
OPENOPEN8_SWEEP_GRACE = envfloat("OPENOPEN8_SWEEP_GRACE", "60")
# A request's place under a concurrency limit lives this long unrenewed (seconds); its worker renews it every third of
# that while the request runs, so a dead worker's places come back within it.
OPENOPEN8_LEASE_TTL = envfloat("OPENOPEN8_LEASE_TTL", "15")
# gunicorn workers on PostgreSQL write a request's completed usage row after its answer has gone out, retrying while
# the database is away (gateway/usage_writers.py); off: the answer waits for the row's commit.
OPENOPEN8_WRITE_AFTER_ANSWER = envbool("OPENOPEN8_WRITE_AFTER_ANSWER", "true")
# Keep the prompt text in usage logs (off: only its length and a hash are kept).
# A bearer token /metrics asks for; unset, /metrics is open (then keep it off the public network).
OPENOPEN8_METRICS_TOKEN = envsecret("OPENOPEN8_METRICS_TOKEN", "")
OPENOPEN8_LOG_PROMPTS = envbool("OPENOPEN8_LOG_PROMPTS", "false")
# Whether images a provider made for a client that went away before it had them are charged (the provider charged for
# them); either way the usage row says the client left, and when.
OPENOPEN8_CHARGE_DEPARTED_CLIENTS = envbool("OPENOPEN8_CHARGE_DEPARTED_CLIENTS", "true")
# A JSON file of extra or overriding model rules, merged over gateway/model_rules.json.
OPENOPEN8_MODEL_RULES_FILE = env("OPENOPEN8_MODEL_RULES_FILE")

REDIS_URL = env("REDIS_URL")
# Redis connections a process keeps for limits, circuits and the configuration version; a call beyond them waits
# up to the timeout (seconds) for one to come free.
OPENOPEN8_REDIS_POOL_SIZE = envint("OPENOPEN8_REDIS_POOL_SIZE", "64")
OPENOPEN8_REDIS_POOL_TIMEOUT = envfloat("OPENOPEN8_REDIS_POOL_TIMEOUT", "10")
# Database connections a process keeps open (and shares among its requests in flight), for either database.
OPENOPEN8_DB_POOL_SIZE = envint("OPENOPEN8_DB_POOL_SIZE", "16")
# How long a request waits for a PostgreSQL connection (seconds) before it is answered 503 with Retry-After: while the
# database restarts, a wait this long rides it out; past it the client hears the truth.
OPENOPEN8_DB_POOL_TIMEOUT = envfloat("OPENOPEN8_DB_POOL_TIMEOUT", "5")
DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL", f"sqlite:///{DATA_DIR / 'openopen8.sqlite3'}"), conn_max_age=60, conn_health_checks=True
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Django's SQLite backend with a pool of open connections per process, and checkpoints in the background under
    # gunicorn (openopen8/sqlite/base.py). Many request threads write to one file: wait for the lock instead of
    # failing, take the write lock at the start of a transaction (no deadlock on upgrade), and let readers run beside
    # the writer (WAL).
    DATABASES["default"]["ENGINE"] = "openopen8.sqlite"
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "pool": {"max_size": OPENOPEN8_DB_POOL_SIZE, "timeout": 30},
    }
    # A file, not memory, so that a live test server's threads each get their own connection.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-openopen8.sqlite3")}
elif DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A pool per process: a request gives its connection back while it waits on a provider (gateway/routing.py), so
    # hundreds of requests in flight share a few connections.
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = False
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2, "max_size": OPENOPEN8_DB_POOL_SIZE, "timeout": OPENOPEN8_DB_POOL_TIMEOUT}
    # Parameters travel apart from the SQL, and psycopg prepares a statement once a connection has run it 5 times, so
    # the statements every request sends are not parsed and planned each time (bench/RESULTS.md). Django leaves
    # preparing off unless asked, for poolers that cannot carry prepared statements: set
    # OPENOPEN8_DB_PREPARED_STATEMENTS=false behind PgBouncer in transaction mode older than 1.21.
    DATABASES["default"]["OPTIONS"]["server_side_binding"] = True
    DATABASES["default"]["OPTIONS"]["prepare_threshold"] = (
        5 if envbool("OPENOPEN8_DB_PREPARED_STATEMENTS", "true") else None)

if REDIS_URL:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "axes",
    "django_tasks",
    "django_tasks_db",
    "auditlog",
    "gateway",
    # Not the PyPI "channels" package (Django Channels), which must never be installed beside this app.
    "channels.apps.ChannelsConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "openopen8.middleware.ConsoleSessionMiddleware",
    "openopen8.middleware.ConsoleLocaleMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "openopen8.middleware.ConsoleAuthenticationMiddleware",
    "openopen8.middleware.ConsoleMessageMiddleware",
    "openopen8.middleware.ConsoleAuditlogMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "openopen8.middleware.ConsoleAxesMiddleware",  # last, as django-axes asks
]

# Console logins: after AXES_FAILURE_LIMIT wrong passwords for one user name from one address, that pair is locked
# out for the cool-off (by the pair, so an attacker cannot lock an operator out from elsewhere).
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_FAILURE_LIMIT = envint("OPENOPEN8_LOGIN_FAILURE_LIMIT", "5")
AXES_COOLOFF_TIME = timedelta(minutes=envint("OPENOPEN8_LOGIN_COOLOFF_MINUTES", "15"))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_VERBOSE = False
# axes looks for its middleware by name; ConsoleAxesMiddleware is it, skipped for API calls.
SILENCED_SYSTEM_CHECKS = ["axes.W002"]

# Behind TLS (a terminating proxy that sets X-Forwarded-Proto): secure cookies, HSTS and a redirect to https, all
# but the probes, which load balancers ask over plain HTTP.
OPENOPEN8_HTTPS = envbool("OPENOPEN8_HTTPS", "false")
if OPENOPEN8_HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$", r"^metrics$"]
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("OPENOPEN8_HSTS_SECONDS", "31536000")
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("OPENOPEN8_HSTS_INCLUDE_SUBDOMAINS", "true")
    # Preloading is a commitment no setting can take back: the operator submits the domain themselves.
    SILENCED_SYSTEM_CHECKS += ["security.W021"]

# The history of changes (gateway/audit.py) keeps old and new values as JSON, not as text.
AUDITLOG_STORE_JSON_CHANGES = True

CSRF_FAILURE_VIEW = "gateway.exception_handlers.csrf_failure"
ROOT_URLCONF = "openopen8.urls"
WSGI_APPLICATION = "openopen8.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATIC_ROOT.mkdir(exist_ok=True)
# Serve admin assets from the installed apps even when collectstatic has not run.
WHITENOISE_USE_FINDERS = True
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": DATA_DIR / "files"}},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
    "images": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": DATA_DIR / "images"}},
    # Input images of image jobs, kept until the job ends.
    "jobs": {"BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"location": DATA_DIR / "jobs"}},
}

# Hosted images in S3-compatible object storage, for several nodes; the gateway still serves (and expires) the URLs.
OPENOPEN8_S3_BUCKET = env("OPENOPEN8_S3_BUCKET")
if OPENOPEN8_S3_BUCKET:
    S3_OPTIONS = {
        "bucket_name": OPENOPEN8_S3_BUCKET,
        "endpoint_url": env("OPENOPEN8_S3_ENDPOINT_URL") or None,
        "region_name": env("OPENOPEN8_S3_REGION") or None,
        "access_key": envsecret("OPENOPEN8_S3_ACCESS_KEY", "") or None,
        "secret_key": envsecret("OPENOPEN8_S3_SECRET_KEY", "") or None,
        "default_acl": None,
        "querystring_auth": True,
    }
    STORAGES["images"] = {"BACKEND": "storages.backends.s3.S3Storage",
                          "OPTIONS": {**S3_OPTIONS, "location": env("OPENOPEN8_S3_PREFIX", "images")}}
    STORAGES["jobs"] = {"BACKEND": "storages.backends.s3.S3Storage",
                        "OPTIONS": {**S3_OPTIONS, "location": env("OPENOPEN8_S3_JOBS_PREFIX", "jobs")}}

# Image jobs (Prefer: respond-async) are tasks of Django's tasks framework, kept in the database (django-tasks-db).
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend", "QUEUES": ["default"]}}

# Uploads larger than this go to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
# One request-size limit for JSON and multipart alike: the 413 in GatewayApi.initial, and Django's own check.
DATA_UPLOAD_MAX_MEMORY_SIZE = OPENOPEN8_MAX_REQUEST_BYTES

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["gateway.auth.BearerTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["gateway.auth.HasApiToken"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["gateway.parsers.StrictJSONParser"],
    "EXCEPTION_HANDLER": "gateway.exception_handlers.exception_handler",
    "UNAUTHENTICATED_USER": None,
}

LANGUAGE_CODE = "en-us"
# The console follows the browser's language among these; the client API answers in English whatever it asks.
LANGUAGES = [("en", "English"), ("zh-hans", "简体中文")]
# The project's own catalogue (locale/zh_Hans/LC_MESSAGES/django.po, compiled to django.mo beside it).
LOCALE_PATHS = [BASE_DIR / "locale"]
# The console shows times in this zone (an IANA name such as Asia/Shanghai); everything is stored in UTC, and the
# budget periods and the client API keep UTC.
TIME_ZONE = env("OPENOPEN8_TIME_ZONE", "UTC")
try:
    zoneinfo.ZoneInfo(TIME_ZONE)
except (zoneinfo.ZoneInfoNotFoundError, ValueError):
    raise ImproperlyConfigured(f"OPENOPEN8_TIME_ZONE must be an IANA time zone such as Asia/Shanghai, not "
                               f"{TIME_ZONE!r}") from None
USE_I18N = True
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("OPENOPEN8_LOG_LEVEL", "INFO")},
}
