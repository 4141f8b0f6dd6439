# make run: set up and serve the gateway on the embedded default (SQLite + local files) at http://127.0.0.1:8000
# make test: set up and run the test suite (DATABASE_URL / REDIS_URL, when set, point it at PostgreSQL / Redis)
# make smoke: what a new user does, from a copy of this tree: a fresh virtualenv with requirements.txt alone, make run
#             with each worker class, one image with the demo key, a graceful stop (.ci/run runs it)

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= $(or $(OPENOPEN8_DATA_DIR),data)
BIND ?= $(or $(OPENOPEN8_BIND),127.0.0.1:8000)
SECRET_FILE := $(DATA_DIR)/secret_key

.PHONY: run test smoke lint bench install install-dev browser screenshots clean

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

# The official Node SDK for the tests that read streams as Node clients do; without npm those tests skip.
tests/node/node_modules/.installed: tests/node/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tests/node --no-audit --no-fund --silent && touch $@; \
	else echo "npm not found: the Node SDK tests will skip"; fi

$(SECRET_FILE):
	mkdir -p $(DATA_DIR)
	umask 077 && $(BIN)/python -c "import secrets; print(secrets.token_urlsafe(50))" > $@

run: install $(SECRET_FILE)
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) \
		$(BIN)/python manage.py migrate --noinput -v0
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) \
		$(BIN)/python manage.py bootstrap --url http://$(BIND)
	OPENOPEN8_DATA_DIR=$(DATA_DIR) OPENOPEN8_DEBUG=false OPENOPEN8_SECRET_KEY_FILE=$(SECRET_FILE) OPENOPEN8_BIND=$(BIND) \
		exec $(BIN)/gunicorn -c gunicorn.conf.py openopen8.wsgi:application

# The console's browser tests drive Debian's Chromium (and a font with Chinese glyphs, for the screenshots); installed
# here where apt-get may run, else those tests skip and say why.
BROWSER_PACKAGES := chromium chromium-driver fonts-wqy-microhei
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq $(BROWSER_PACKAGES) >/dev/null) || \
		echo "Chromium could not be installed: the browser tests will skip"; \
	else echo "Chromium not found and apt-get not available here: the browser tests will skip"; fi

test: lint tests/node/node_modules/.installed browser
	$(BIN)/python -m pytest

# The README's pictures of the dashboard, in English and Chinese (1440x900), from the browser tests' traffic.
screenshots: install-dev browser
	OPENOPEN8_SCREENSHOTS=docs $(BIN)/python -m pytest -q tests/gateway/test_console_browser.py \
		-k "lands_on_the_dashboard or chinese_browser"

smoke:
	$(PYTHON) .ci/smoke.py

lint: install-dev
	$(BIN)/ruff check . .ci/smoke.py
	$(BIN)/mypy . && $(BIN)/mypy .ci/smoke.py
	$(BIN)/lint-imports --no-cache
	$(BIN)/python manage.py makemigrations --check --dry-run >/dev/null

# The benchmark needs nginx with its echo module and wrk (Debian packages) and this machine's PostgreSQL and Redis.
bench: install-dev
	command -v nginx >/dev/null && command -v wrk >/dev/null && test -e /usr/lib/nginx/modules/ngx_http_echo_module.so || \
		(apt-get update -qq && apt-get install -y -qq nginx libnginx-mod-http-echo wrk)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache
