# Two commands matter: `make demo` and `make test` (see README). The rest are helpers.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
comma := ,

.PHONY: demo demo-serve test lint typecheck check worker beat migrate schema clean bench

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

## make demo: install, get a database (embedded PostgreSQL unless DATABASE_URL), migrate, load
## the demo data (accounts, usage, invoices, cards, payments, a fraud ring), then run the pipeline
## it demonstrates and serve on http://127.0.0.1:$(PORT) (`make demo PORT=8001`): see demo-serve.
## However it ends (Ctrl-C, a failed step), the pipeline and the embedded PostgreSQL stop with it.
PORT ?= 8000
DEMO_LOGS ?= .data
demo: $(STAMP)
	@export DEBUG=$${DEBUG:-1}; \
	trap '$(BIN)/python billing_site/database.py stop' EXIT; trap 'exit 130' INT TERM HUP; \
	set -e; \
	$(BIN)/python manage.py migrate --no-input -v 0; \
	$(BIN)/python manage.py hourly_partitions; \
	$(BIN)/python manage.py load_demo_data; \
	$(BIN)/python manage.py load_demo_usage; \
	$(BIN)/python manage.py load_demo_invoices; \
	$(BIN)/python manage.py load_demo_payments; \
	$(BIN)/python manage.py load_demo_fraud; \
	$(MAKE) --no-print-directory demo-serve PORT=$(PORT) DEMO_LOGS=$(DEMO_LOGS)

## make demo-serve: what `make demo` runs once the data is loaded. The pipeline: a Redis (REDIS_URL
## if set, else a redis-server of its own on a free port, no persistence), a Celery worker serving
## every queue and beat (the rollup every minute, the outbox every 15 s, ...), logging to
## $(DEMO_LOGS)/demo-worker.log and demo-beat.log; a first rollup drain is queued at once, so usage
## sent after start is in the costs within seconds, not at the next minute. Then the logins, keys
## and curl lines, and runserver on 127.0.0.1:$(PORT). Ctrl-C stops them all (only the processes it
## started: the worker and beat get SIGQUIT and, if still there 10 s later, SIGKILL, before their
## redis-server stops, so a worker mid-task never hangs reconnecting to it), then the embedded PostgreSQL.
demo-serve:
	@export DEBUG=$${DEBUG:-1}; \
	redis_pid=; worker_pid=; beat_pid=; \
	stop_pipeline() { \
		for pid in $$worker_pid $$beat_pid; do kill -QUIT $$pid 2>/dev/null || true; done; \
		for _ in $$(seq 100); do \
			alive=; for pid in $$worker_pid $$beat_pid; do kill -0 $$pid 2>/dev/null && alive=1; done; \
			[ -z "$$alive" ] && break; sleep 0.1; \
		done; \
		for pid in $$worker_pid $$beat_pid; do kill -KILL $$pid 2>/dev/null || true; done; \
		if [ -n "$$redis_pid" ]; then kill -TERM $$redis_pid 2>/dev/null || true; fi; \
		for pid in $$worker_pid $$beat_pid $$redis_pid; do wait $$pid 2>/dev/null || true; done; \
		$(BIN)/python billing_site/database.py stop; \
	}; \
	trap stop_pipeline EXIT; trap 'exit 130' INT TERM HUP; \
	set -e; \
	mkdir -p $(DEMO_LOGS); \
	if [ -z "$$REDIS_URL$$CELERY_BROKER_URL" ]; then \
		command -v redis-server >/dev/null || { echo "make demo: redis-server is not installed (or set REDIS_URL)" >&2; exit 1; }; \
		redis_port=$$($(BIN)/python -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"); \
		redis-server --bind 127.0.0.1 --port $$redis_port --save '' --appendonly no --loglevel warning \
			--logfile $(abspath $(DEMO_LOGS))/demo-redis.log & redis_pid=$$!; \
		export REDIS_URL=redis://127.0.0.1:$$redis_port/0; \
		$(BIN)/python -c "import socket, sys, time; [time.sleep(0.1) for _ in range(100) if socket.socket().connect_ex(('127.0.0.1', $$redis_port))]"; \
	fi; \
	$(BIN)/celery -A billing_site worker --concurrency 3 -n demo@%h >$(abspath $(DEMO_LOGS))/demo-worker.log 2>&1 & \
	worker_pid=$$!; \
	$(BIN)/celery -A billing_site beat --schedule $(abspath $(DEMO_LOGS))/demo-beat-schedule --pidfile= \
		>$(abspath $(DEMO_LOGS))/demo-beat.log 2>&1 & \
	beat_pid=$$!; \
	$(BIN)/celery -A billing_site call metering.rollup_usage --queue rollup >/dev/null; \
	echo "Pipeline: Redis $${REDIS_URL:-$$CELERY_BROKER_URL}$${redis_pid:+ (redis-server pid $$redis_pid)}, worker pid $$worker_pid, beat pid $$beat_pid; logs in $(abspath $(DEMO_LOGS))/demo-*.log"; \
	$(BIN)/python manage.py demo_access --port $(PORT); \
	$(BIN)/python manage.py runserver --noreload 127.0.0.1:$(PORT)

## make test: install and run the whole suite against a real PostgreSQL, in TEST_WORKERS parallel
## processes (pytest-xdist; each its own test database and Redis). TEST_WORKERS=0 runs it in one.
TEST_WORKERS ?= 4
test: $(STAMP)
	$(BIN)/python -m pytest $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist load) $(PYTEST_ARGS)

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

## make bench: ingestion W1-W3, rollup W4 and the costs API, freshness W5, invoicing, the payments charge path (outbox drain → tasks → invoices_charge), antifraud evaluation and the credit-limit check, the staff home page at 1,000,000 accounts and 10,000,000 invoices, and the data plane's soak through the scale path (API → NATS JetStream → chdb → hourly usage; 2 M events by default, BENCH_DATAPLANE_ARGS="--events 100000000" for the full soak; figures also as JSON under .data/) (docs/benchmarks.md)
bench: $(STAMP)
	$(BIN)/python -m bench.ingest $(BENCH_INGEST_ARGS)
	$(BIN)/python -m bench.rollup $(BENCH_ROLLUP_ARGS)
	$(BIN)/python -m bench.freshness $(BENCH_FRESHNESS_ARGS)
	$(BIN)/python -m bench.invoicing $(BENCH_INVOICING_ARGS)
	$(BIN)/python -m bench.payments $(BENCH_PAYMENTS_ARGS)
	$(BIN)/python -m bench.antifraud $(BENCH_ANTIFRAUD_ARGS)
	$(BIN)/python -m bench.backoffice $(BENCH_BACKOFFICE_ARGS)
	$(BIN)/python -m bench.dataplane $(BENCH_DATAPLANE_ARGS)
