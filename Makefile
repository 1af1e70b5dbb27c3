# Two commands matter: `make demo` and `make test` (see README). The rest are helpers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
comma := ,

.PHONY: demo test lint typecheck check worker beat migrate schema clean bench

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

## make demo: install, get a database (embedded PostgreSQL unless DATABASE_URL), migrate, load
## the demo data (accounts, usage, invoices, cards, payments, a fraud ring), print the logins, keys and
## curl examples, serve on http://127.0.0.1:8000.
## However it ends (Ctrl-C, a failed step), the embedded PostgreSQL is stopped with it.
demo: $(STAMP)
	@export DEBUG=$${DEBUG:-1}; \
	trap '$(BIN)/python billing_site/database.py stop' EXIT; trap 'exit 130' INT TERM HUP; \
	set -e; \
	$(BIN)/python manage.py migrate --no-input -v 0; \
	$(BIN)/python manage.py load_demo_data; \
	$(BIN)/python manage.py load_demo_usage; \
	$(BIN)/python manage.py load_demo_invoices; \
	$(BIN)/python manage.py load_demo_payments; \
	$(BIN)/python manage.py load_demo_fraud; \
	$(BIN)/python manage.py demo_access; \
	$(BIN)/python manage.py runserver 127.0.0.1:8000

## make test: install and run the whole suite against a real PostgreSQL
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy .

schema: $(STAMP)
	DJANGO_SETTINGS_MODULE=billing_site.settings.test $(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null

check: lint typecheck schema test

migrate: $(STAMP)
	$(BIN)/python manage.py migrate

## a Celery worker / the beat scheduler (need REDIS_URL or CELERY_BROKER_URL). The worker serves
## every queue; `make worker QUEUES=rollup` serves only those named (comma-separated), see README.
## Logging follows LOG_LEVEL and LOG_FORMAT, as everywhere.
QUEUES ?=
worker: $(STAMP)
	$(BIN)/celery -A billing_site worker $(if $(QUEUES),-Q $(QUEUES) -n $(firstword $(subst $(comma), ,$(QUEUES)))@%h)

beat: $(STAMP)
	$(BIN)/celery -A billing_site beat

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache staticfiles

## make bench: ingestion W1-W3, rollup W4 and the costs API, freshness W5, invoicing, the payments charge path (outbox drain → tasks → invoices_charge), antifraud evaluation and the credit-limit check (docs/benchmarks.md)
bench: $(STAMP)
	$(BIN)/python -m bench.ingest $(BENCH_INGEST_ARGS)
	$(BIN)/python -m bench.rollup $(BENCH_ROLLUP_ARGS)
	$(BIN)/python -m bench.freshness $(BENCH_FRESHNESS_ARGS)
	$(BIN)/python -m bench.invoicing $(BENCH_INVOICING_ARGS)
	$(BIN)/python -m bench.payments $(BENCH_PAYMENTS_ARGS)
	$(BIN)/python -m bench.antifraud $(BENCH_ANTIFRAUD_ARGS)
