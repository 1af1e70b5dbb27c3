"""The staff home page at size: how long ``/admin/`` takes with 1,000,000 accounts and
10,000,000 invoices (target: <= 1 s, issue 21).

    make bench                                                      # with the other benchmarks
    .venv/bin/python -m bench.backoffice                            # 1,000,000 accounts, 10,000,000 invoices
    .venv/bin/python -m bench.backoffice --accounts 10000 --invoices 100000   # a quick run

The tables are filled set-based (``INSERT … SELECT … FROM generate_series``) in a database of
their own, ``billing_bench_backoffice`` on 127.0.0.1:5432 (DATABASE_URL to use another), kept
between runs: a run adds only what is missing (``--fresh`` drops it first). Besides the accounts
(states mixed: active, pending, suspended, blocked, closed) and their monthly invoices (paid,
issued, written off, over the months before this one), it writes what the page's other figures
read: a payment per account (some failed with a decline code, a few unknown), webhook events
(almost all processed), outbox messages (almost all delivered), the fraud queue, rollup shards
and a few thousand usage events waiting.

Then, in this process, a logged-in superuser's Django test client asks for ``/admin/`` (the
real view, template and admin app list) ``--samples`` times after one warm-up; each of the
page's reads is also timed alone. The warm-up finds no finance figures kept, so it asks the
selectors itself (timed as ``page_first_s``); the samples show those kept, as beat's refresh
keeps them (its duration: ``finance_refresh_s``). Printed, and written as JSON to ``--json`` (default
.data/bench-backoffice-<time>.json), with the load average beside each figure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from bench import INSERT_INVOICES, loadavg, local_database_url, setup_django

BENCH_DB = "billing_bench_backoffice"
FIRST_ID = 8_000_000_000_000  # bench accounts' ids: far from anything else in the database
TARGET_S = 1.0
ROOT = Path(__file__).resolve().parent.parent


def database_url(*, fresh: bool) -> str:
    if fresh and not os.environ.get("DATABASE_URL"):
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
    return local_database_url(BENCH_DB)


def _count(cursor: Any, sql: str) -> int:
    cursor.execute(sql)
    return int(cursor.fetchone()[0])


def prepare(*, accounts: int, invoices: int) -> dict[str, Any]:
    """Fill the tables up to the sizes asked for (set-based; what exists is kept)."""
    from django.core.management import call_command
    from django.db import connection, transaction

    call_command("migrate", verbosity=0)
    per_account = max(1, invoices // accounts)
    written: dict[str, Any] = {}
    started = time.perf_counter()
    with transaction.atomic(), connection.cursor() as cursor:  # events waiting for the rollup (never rolled up here)
        from metering.horizon import writer_lock

        writer_lock()  # what every writer of events takes first (metering/horizon.py)
        if not _count(cursor, f"SELECT count(*) FROM metering_usageevent WHERE account_id >= {FIRST_ID}"):
            cursor.execute(
                """
                INSERT INTO metering_usageevent (account_id, event_id, seq, occurred_at, received_at, kind, sku,
                    quantity)
                SELECT %(first)s + g, 'bench-' || g, g, now() - interval '10 minutes', now() - interval '5 minutes',
                       'usage', 'network.egress', 1
                FROM generate_series(0, 4999) AS g
                """,
                {"first": FIRST_ID},
            )
    with transaction.atomic(), connection.cursor() as cursor:  # all or nothing: a killed run leaves no half
        have = _count(cursor, f"SELECT count(*) FROM accounts_billingaccount WHERE id >= {FIRST_ID}")
        if have < accounts:
            cursor.execute(
                """
                INSERT INTO accounts_billingaccount (id, name, email, kind, country, currency, tax_id, phone,
                    address_line1, address_line2, address_city, address_postal_code, address_region, state,
                    state_cause, credit_limit, payment_terms_days, created_at, updated_at)
                SELECT %(first)s + g, 'Bench ' || g, 'ops' || g || '@bench.test',
                       CASE WHEN g %% 3 = 0 THEN 'individual' ELSE 'business' END,
                       (ARRAY['NL','DE','FR','US','GB'])[1 + g %% 5], 'EUR', '', '', 'Street 1', '', 'City', '1000', '',
                       CASE WHEN g %% 100 < 90 THEN 'active' WHEN g %% 100 < 95 THEN 'pending'
                            WHEN g %% 100 < 98 THEN 'suspended' WHEN g %% 100 < 99 THEN 'blocked' ELSE 'closed' END,
                       CASE WHEN g %% 100 BETWEEN 95 AND 97 THEN 'debt' ELSE '' END,
                       0, 14, now() - make_interval(days => g %% 700), now()
                FROM generate_series(%(from)s, %(to)s) AS g
                """,
                {"first": FIRST_ID, "from": have, "to": accounts - 1},
            )
            written["accounts"] = accounts - have
        have_invoices = _count(cursor, f"SELECT count(*) FROM invoicing_invoice WHERE account_id >= {FIRST_ID}")
        if have_invoices < invoices:
            # Invoice k of account a: the month k + 1 months before this one; numbered BENCH-<id>.
            this_month = dt.datetime.now(dt.UTC).date().replace(day=1)
            cursor.execute(
                INSERT_INVOICES
                + """
                SELECT %(first_invoice)s + n, %(first)s + n / %(per)s, m.start, m.start + interval '1 month', 'period',
                       s.status, 'EUR', 'BENCH-' || n, 10000 + n %% 5000, 21, 'NL', 'domestic', '', 2100,
                       12100 + n %% 5000,
                       0, CASE WHEN s.status = 'paid' THEN 12100 + n %% 5000 ELSE 0 END, 0,
                       CASE WHEN s.status = 'uncollectible' THEN 12100 + n %% 5000 ELSE 0 END, 0, 14, '{}', '{}',
                       m.start + interval '1 month 2 hours', m.start + interval '1 month 2 hours',
                       m.start + interval '1 month 14 days',
                       CASE WHEN s.status = 'paid' THEN m.start + interval '1 month 1 day' END,
                       m.start + interval '1 month 2 hours'
                FROM generate_series(%(from)s, %(to)s) AS n
                CROSS JOIN LATERAL (
                    SELECT (%(this_month)s::date - make_interval(months => 1 + n %% %(per)s))::date AS start) m
                CROSS JOIN LATERAL (SELECT CASE WHEN n %% %(per)s = 0 AND n %% 7 = 0 THEN 'issued'
                                               WHEN n %% 97 = 0 THEN 'uncollectible' ELSE 'paid' END AS status) s
                """,
                {
                    "first_invoice": FIRST_ID,
                    "first": FIRST_ID,
                    "per": per_account,
                    "from": have_invoices,
                    "to": invoices - 1,
                    "this_month": this_month,
                },
            )
            written["invoices"] = invoices - have_invoices
        have_payments = _count(cursor, f"SELECT count(*) FROM payments_payment WHERE account_id >= {FIRST_ID}")
        if have_payments < accounts:
            cursor.execute(  # the newest invoice of each account: succeeded, 3 % failed, a few unknown
                """
                INSERT INTO payments_payment (id, account_id, invoice_id, attempt, trigger, status, amount_minor,
                    currency, gateway, gateway_customer_id, idempotency_key, gateway_charge_id, decline_code,
                    decline_message, retryable, client_secret, next_action_url, amount_refunded_minor,
                    amount_disputed_minor, created_at, updated_at)
                SELECT %(first)s + g, %(first)s + g, %(first)s + g * %(per)s, 1, 'after_issue',
                       CASE WHEN g %% 100 < 3 THEN 'failed' WHEN g %% 20000 = 7 THEN 'unknown' ELSE 'succeeded' END,
                       12100, 'EUR', 'sandbox', '', 'bench-' || g, '',
                       CASE WHEN g %% 100 < 3 THEN (ARRAY['insufficient_funds','lost_card','do_not_honor'])[1 + g %% 3]
                            ELSE '' END,
                       '', true, '', '', 0, 0,
                       now() - make_interval(mins => g %% 43200), now() - make_interval(mins => g %% 43200)
                FROM generate_series(%(from)s, %(to)s) AS g
                """,
                {"first": FIRST_ID, "per": per_account, "from": have_payments, "to": accounts - 1},
            )
            written["payments"] = accounts - have_payments
        # Webhook events (half as many as accounts) and outbox messages (as many): a handful
        # not processed or delivered; every account's standing with the fraud team (0.1 % in review).
        webhooks = max(accounts // 2, 10)
        have = _count(cursor, "SELECT count(*) FROM payments_webhookevent WHERE event_id LIKE 'evt_bench_%%'")
        if have < webhooks:
            cursor.execute(
                """
                INSERT INTO payments_webhookevent (gateway, event_id, type, payload, status, attempts, error,
                    account_id, received_at, processed_at)
                SELECT 'stripe', 'evt_bench_' || g, 'charge.succeeded', '{}',
                       CASE WHEN g %% 50000 = 0 THEN 'pending' ELSE 'processed' END, 1, '', NULL,
                       now() - make_interval(secs => g), now() - make_interval(secs => g)
                FROM generate_series(%(from)s, %(to)s) AS g
                """,
                {"from": have + 1, "to": webhooks},
            )
            written["webhook_events"] = webhooks - have
        messages = max(accounts, 10)
        have = _count(cursor, "SELECT count(*) FROM outbox_outboxmessage WHERE name = 'bench.message'")
        if have < messages:
            cursor.execute(
                """
                INSERT INTO outbox_outboxmessage (kind, name, payload, account_id, created_at, attempts, last_error,
                    delivered_at)
                SELECT 'task', 'bench.message', '{}', NULL, now() - make_interval(secs => g), 1, '',
                       CASE WHEN g %% 100000 = 0 THEN NULL ELSE now() - make_interval(secs => g) END
                FROM generate_series(%(from)s, %(to)s) AS g
                """,
                {"from": have + 1, "to": messages},
            )
            written["outbox_messages"] = messages - have
        have = _count(cursor, f"SELECT count(*) FROM antifraud_accountrisk WHERE account_id >= {FIRST_ID}")
        if have < accounts:
            cursor.execute(
                """
                INSERT INTO antifraud_accountrisk (account_id, status, score, flagged_at, limit_raised_at_count,
                    updated_at)
                SELECT %(first)s + g, CASE WHEN g %% 1000 = 1 THEN 'review' WHEN g %% 100 = 98 THEN 'blocked'
                                           ELSE 'clear' END,
                       g %% 100, now() - make_interval(mins => g %% 5000), 0, now()
                FROM generate_series(%(from)s, %(to)s) AS g
                """,
                {"first": FIRST_ID, "from": have, "to": accounts - 1},
            )
            written["account_risks"] = accounts - have
        cursor.execute(
            "INSERT INTO metering_rollupshard (shard, txid_horizon, events_processed, updated_at, last_duration_ms) "
            "SELECT s, 0, 0, now(), 40 FROM generate_series(0, 15) s ON CONFLICT (shard) DO NOTHING"
        )
        written.update(prepare_money(cursor))
    if written:
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE")  # autocommit here: the visibility map for index-only scans
        print(f"tables: wrote {written} in {time.perf_counter() - started:.0f} s")
    else:
        print("tables: already at size")
    return written


def prepare_money(cursor: Any) -> dict[str, int]:
    """What finance's figures on the page read, each step idempotent and set-based on top of the
    fill above (a database filled before these steps gains them without a rebuild):

    - receivables past due: 2 % of the accounts leave their invoices of the last four months
      unpaid, 0.2 % also the older ones (half of them half paid), so the ageing has every
      bucket (their due dates are the 14th of the month after their period);
    - collections: one ``InvoicePayment`` per paid invoice issued this month or last (revenue
      collected: a million a month, as the close issues);
    - dunning cases for the failed first charges (half resolved, a fifth written off, the rest
      open; three in ten with the account suspended), so the funnel has every stage."""
    written: dict[str, int] = {}
    this_month = dt.datetime.now(dt.UTC).date().replace(day=1)
    last_month = (this_month - dt.timedelta(days=1)).replace(day=1)
    params = {"first": FIRST_ID, "this_month": this_month, "last_month": last_month}
    cursor.execute(  # the status_due index: one descent
        "SELECT EXISTS (SELECT 1 FROM invoicing_invoice WHERE status = 'issued' AND due_at < %(last_month)s "
        "AND account_id >= %(first)s)",
        params,
    )
    if not cursor.fetchone()[0]:
        cursor.execute(
            """
            UPDATE invoicing_invoice
            SET status = 'issued', paid_at = NULL,
                amount_paid_minor = CASE WHEN id %% 2 = 1 THEN total_minor / 2 ELSE 0 END
            WHERE account_id >= %(first)s AND status = 'paid' AND account_id %% 50 = 1
              AND (period_start >= %(this_month)s::date - interval '4 months' OR account_id %% 500 = 1)
            """,
            params,
        )
        written["invoices_unpaid_again"] = cursor.rowcount
    cursor.execute("SELECT EXISTS (SELECT 1 FROM invoicing_invoicepayment WHERE account_id >= %(first)s)", params)
    if not cursor.fetchone()[0]:
        cursor.execute(
            """
            INSERT INTO invoicing_invoicepayment (account_id, invoice_id, amount_minor, received_minor, currency,
                reference, received_at, credit_grant_id, invoice_paid)
            SELECT account_id, id, total_minor, total_minor, currency, 'bench-' || id, paid_at, NULL, true
            FROM invoicing_invoice
            WHERE issued_at >= %(last_month)s AND account_id >= %(first)s AND status = 'paid'
            """,
            params,
        )
        written["invoice_payments"] = cursor.rowcount
    cursor.execute("SELECT EXISTS (SELECT 1 FROM payments_dunningcase WHERE account_id >= %(first)s)", params)
    if not cursor.fetchone()[0]:
        cursor.execute(
            """
            INSERT INTO payments_dunningcase (account_id, invoice_id, currency, status, first_failure_at, due_at,
                retries_done, last_decline_code, retryable, suspended_account, opened_at, closed_at)
            SELECT p.account_id, p.invoice_id, p.currency,
                   CASE WHEN p.id %% 10 < 5 THEN 'resolved' WHEN p.id %% 10 < 7 THEN 'written_off' ELSE 'open' END,
                   p.created_at, p.created_at + interval '14 days', 2, p.decline_code, true,
                   p.id %% 10 IN (4, 5, 7), p.created_at,
                   CASE WHEN p.id %% 10 < 7 THEN p.created_at + interval '10 days' END
            FROM payments_payment p
            WHERE p.account_id >= %(first)s AND p.attempt = 1 AND p.status = 'failed'
            ON CONFLICT (invoice_id) DO NOTHING
            """,
            params,
        )
        written["dunning_cases"] = cursor.rowcount
    return written


def logged_in_client() -> Any:
    """A staff browser logged in to the admin: a superuser, force-logged-in with its second
    factor passed. The one place in the benchmarks that knows how."""
    from django.test import Client

    from accounts import services as account_services
    from accounts.models import User

    user = User.objects.filter(email="bench@ops.test").first() or account_services.operator_create(
        email="bench@ops.test",
        password="pw-long-enough",  # noqa: S106 (a bench login)
        groups=[],
        superuser=True,
    )
    from django_otp import DEVICE_ID_SESSION_KEY
    from django_otp.plugins.otp_totp.models import TOTPDevice

    # Signed in as django-two-factor-auth's login leaves a session (as the tests' ``staff_login``):
    # the verifying device's persistent id in it; without it every admin page redirects.
    device = TOTPDevice.objects.filter(user=user, confirmed=True).first() or TOTPDevice.objects.create(
        user=user, name="bench", confirmed=True
    )
    client = Client()
    client.force_login(user)
    session = client.session
    session[DEVICE_ID_SESSION_KEY] = device.persistent_id
    session.save()
    return client


def reads() -> dict[str, Any]:
    """Each of the page's reads alone (the selectors it calls)."""
    from accounts import selectors as account_selectors
    from antifraud import selectors as antifraud_selectors
    from billing_site.outbox import selectors as outbox_selectors
    from invoicing import selectors as invoicing_selectors
    from metering import selectors as metering_selectors
    from payments import selectors as payment_selectors

    this_month = dt.datetime.now(dt.UTC).date().replace(day=1)
    last_month = (this_month - dt.timedelta(days=1)).replace(day=1)
    return {
        "accounts_by_state": account_selectors.billing_account_counts_by_state,
        "review_queue": antifraud_selectors.review_queue_backlog,
        "rollup_progress": metering_selectors.rollup_progress,
        "webhook_backlog": payment_selectors.webhook_backlog,
        "payments_open": payment_selectors.payments_open,
        "outbox_backlog": outbox_selectors.backlog,
        "last_period_closed": invoicing_selectors.last_period_closed,
        "receivables_ageing": invoicing_selectors.receivables_ageing,
        "revenue_this_month": lambda: invoicing_selectors.revenue(month=this_month),
        "revenue_last_month": lambda: invoicing_selectors.revenue(month=last_month),
        "dunning_funnel_last_month": lambda: payment_selectors.dunning_funnel(month=last_month),
    }


def run(*, samples: int) -> dict[str, Any]:
    from django.core.cache import cache
    from django.db import connection

    from billing_site.backoffice import dashboard

    client = logged_in_client()
    cache.delete(dashboard.FINANCE_CACHE_KEY)  # the first load asks finance's selectors itself
    started = time.perf_counter()
    first = client.get("/admin/")  # warm-up: templates compiled, connections open
    first_s = time.perf_counter() - started
    assert first.status_code == 200, first.status_code
    assert b'id="ops-pipeline"' in first.content
    assert b'id="ops-receivables"' in first.content  # finance's figures (a superuser sees them)
    timings = []
    for _ in range(samples):
        started = time.perf_counter()
        response = client.get("/admin/")
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
    started = time.perf_counter()
    dashboard.finance_figures_refresh()  # what beat does every 2 minutes
    refresh_s = time.perf_counter() - started
    parts = {}
    for name, read in reads().items():
        started = time.perf_counter()
        read()
        parts[name] = round((time.perf_counter() - started) * 1000, 1)
    from prometheus_client import generate_latest

    from billing_site.backoffice import metrics

    scrapes = []
    for _ in range(3):  # /metrics' database figures (informational: a scrape every 15-60 s, no target)
        started = time.perf_counter()
        generate_latest(metrics.registry())
        scrapes.append(time.perf_counter() - started)
    with connection.cursor() as cursor:
        counts = {
            "accounts": _count(cursor, "SELECT count(*) FROM accounts_billingaccount"),
            "invoices": _count(cursor, "SELECT count(*) FROM invoicing_invoice"),
            "payments": _count(cursor, "SELECT count(*) FROM payments_payment"),
        }
    return {
        "page_p50_s": round(statistics.median(timings), 3),
        "page_max_s": round(max(timings), 3),
        "samples": samples,
        "page_first_s": round(first_s, 3),
        "finance_refresh_s": round(refresh_s, 3),
        "target_s": TARGET_S,
        "reads_ms": parts,
        "metrics_scrape_p50_s": round(statistics.median(scrapes), 3),
        "tables": counts,
        "load": loadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--invoices", type=int, default=10_000_000)
    parser.add_argument("--samples", type=int, default=10, help="page loads measured after one warm-up")
    parser.add_argument("--fresh", action="store_true", help="drop the bench database first")
    parser.add_argument(
        "--json", default=None, help="where to write the figures (default .data/bench-backoffice-*.json)"
    )
    parser.add_argument("--log-file", default="/tmp/bench-backoffice.log", help="where the log lines go")  # noqa: S108
    args = parser.parse_args()
    setup_django(
        database_url(fresh=args.fresh),
        log_file=args.log_file,
        env={"ALLOWED_HOSTS": "testserver,localhost"},
        defaults={"CELERY_BROKER_URL": "memory://"},
    )
    load_before = loadavg()
    written = prepare(accounts=args.accounts, invoices=args.invoices)
    result = run(samples=args.samples)
    ok = result["page_max_s"] <= TARGET_S
    report = {
        "bench": "backoffice",
        "args": {"accounts": args.accounts, "invoices": args.invoices, "samples": args.samples},
        "written": written,
        "load_before": load_before,
        **result,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "ok": ok,
    }
    json_path = (
        Path(args.json) if args.json else ROOT / ".data" / f"bench-backoffice-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2, default=str))
    tables = result["tables"]
    print(
        f"home page (/admin/, superuser): p50 {result['page_p50_s']:.3f} s, max {result['page_max_s']:.3f} s over "
        f"{args.samples} loads at {tables['accounts']:,} accounts, {tables['invoices']:,} invoices, "
        f"{tables['payments']:,} payments (target <= {TARGET_S:.0f} s: {'met' if ok else 'MISSED'}); "
        f"load {result['load']}"
    )
    print(
        f"first load (finance's figures asked by the page itself, none kept): {result['page_first_s']:.3f} s; "
        f"finance's refresh (beat, every 2 min): {result['finance_refresh_s']:.3f} s"
    )
    print("reads (ms, each alone): " + ", ".join(f"{k} {v}" for k, v in result["reads_ms"].items()))
    print(f"/metrics' database figures: p50 {result['metrics_scrape_p50_s']:.3f} s over 3 scrapes (no target)")
    print(f"figures in {json_path}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
