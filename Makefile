# make run: set up and serve the gateway on the embedded default (SQLite + local files) at http://127.0.0.1:8000
# make test: set up and run the test suite (DATABASE_URL / REDIS_URL, when set, point it at PostgreSQL / Redis)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(or $(OPENOPEN8_DATA_DIR),data)
SECRET_FILE := $(DATA_DIR)/secret_key

.PHONY: run test lint bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: requirements.txt $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt $(VENV)/.installed
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

$(SECRET_FILE):
	mkdir -p $(DATA_DIR)
	umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(50))" > $@

run: install $(SECRET_FILE)
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) \
		$(BIN)/python manage.py migrate --noinput -v0
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) \
		$(BIN)/python manage.py bootstrap --url http://127.0.0.1:8000
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) \
		exec $(BIN)/gunicorn -c gunicorn.conf.py openopen8.wsgi:application

test: lint
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/python manage.py makemigrations --check --dry-run >/dev/null

# The benchmark needs nginx with its echo module and wrk (Debian packages) and this machine's PostgreSQL and Redis.
bench: install-dev
	command -v nginx >/dev/null && command -v wrk >/dev/null && test -e /usr/lib/nginx/modules/ngx_http_echo_module.so || \
		(apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-echo wrk)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
