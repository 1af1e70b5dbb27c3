"""Invoicing benchmark: a period close over many accounts from their rated usage.

    make bench                                           # everything, default sizes
    .venv/bin/python -m bench.invoicing --accounts 100000 --days 30

100,000 accounts with 8 SKUs each (a month of daily rated rows per SKU, split over resources
and projects), customers in NL, DE (business, reverse charge), FR (OSS) and the US (outside
the EU), in EUR and USD, some with credit grants and contract discounts. The close is the real
one (``invoicing.services.period_close``, 500 accounts per transaction), PDFs excluded;
target >= 1,000 invoices/s (100,000 in <= 100 s). Then: the ledger check, a re-run (issues
nothing), and PDF rendering timed per invoice.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

from bench.ingest import ROOT, database_url, setup_django

PERIOD = "2026-10"
SKUS = [  # code, EUR price per unit of the synthetic quantity
    ("compute.vcpu", "0.0115"),
    ("compute.ram", "0.0015"),
    ("compute.gpu.a100", "2.29"),
    ("storage.disk.ssd", "0.000128"),
    ("storage.object.requests", "0.00000037"),
    ("network.egress", "0.083"),
    ("network.ipv4", "0.004"),
    ("storage.snapshot", "0.00005"),
]
EXTRA_CATALOG = """{"skus": [
  {"code": "network.ipv4", "name": "Public IPv4 address", "unit": "ip-hour", "kind": "duration",
   "prices": [{"currency": "EUR", "unit_price": "0.004", "valid_from": "2026-01-01T00:00:00Z"},
              {"currency": "USD", "unit_price": "0.005", "valid_from": "2026-01-01T00:00:00Z"}]},
  {"code": "storage.snapshot", "name": "Disk snapshots", "unit": "GB-hour", "kind": "duration",
   "prices": [{"currency": "EUR", "unit_price": "0.00005", "valid_from": "2026-01-01T00:00:00Z"},
              {"currency": "USD", "unit_price": "0.00006", "valid_from": "2026-01-01T00:00:00Z"}]}
]}"""
PROFILES = [  # country, kind, tax id
    ("NL", "business", "NL004495445B01"),
    ("DE", "business", "DE136695976"),
    ("FR", "individual", ""),
    ("US", "business", ""),
]


def prepare(accounts: int, days: int) -> None:
    """Migrate, load the catalog, make ``accounts`` invoicing-bench accounts with a month of
    rated daily usage (reused by later runs), and forget earlier bench invoices."""
    import tempfile

    from django.core.management import call_command
    from django.db import connection, transaction

    call_command("migrate", verbosity=0)
    call_command("load_catalog", str(ROOT / "metering" / "fixtures" / "catalog.json"), verbosity=0)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as extra:
        extra.write(EXTRA_CATALOG)
        extra.flush()
        call_command("load_catalog", extra.name, verbosity=0)
    started = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute("SELECT count(*) FROM accounts_billingaccount WHERE name LIKE 'invbench %%'")
        have = cur.fetchone()[0]
        if have < accounts:
            cur.execute(
                """
                INSERT INTO accounts_billingaccount
                    (id, name, email, kind, country, currency, tax_id, address_line1, address_line2, address_city,
                     address_postal_code, address_region, state, credit_limit, payment_terms_days, created_at,
                     updated_at)
                SELECT (hashint8extended(g, 77) & x'3fffffffffffffff'::bigint) + 1, 'invbench ' || g,
                       'inv' || g || '@bench.test',
                       (%(kinds)s::text[])[1 + g %% 4], (%(countries)s::text[])[1 + g %% 4],
                       CASE WHEN g %% 4 = 3 THEN 'USD' ELSE 'EUR' END, (%(tax_ids)s::text[])[1 + g %% 4],
                       'Benchstraat ' || g, '', 'Amsterdam', '1000 AA', '', 'active', 0, 14, now(), now()
                FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) g
                ON CONFLICT (id) DO NOTHING
                """,
                {
                    "kinds": [p[1] for p in PROFILES],
                    "countries": [p[0] for p in PROFILES],
                    "tax_ids": [p[2] for p in PROFILES],
                    "lo": have,
                    "hi": accounts - 1,
                },
            )
        cur.execute("DROP TABLE IF EXISTS invbench_accounts")
        cur.execute(
            "CREATE UNLOGGED TABLE invbench_accounts AS SELECT row_number() OVER (ORDER BY id) - 1 AS n, id "
            "FROM accounts_billingaccount WHERE name LIKE 'invbench %%' ORDER BY id LIMIT %s",
            [accounts],
        )
        cur.execute(
            "SELECT count(DISTINCT account_id) FROM metering_dailyusage d "
            "JOIN invbench_accounts a ON a.id = d.account_id WHERE d.day >= %s AND d.day < %s",
            [f"{PERIOD}-01", "2026-11-01"],
        )
        with_usage = cur.fetchone()[0]
    if with_usage < accounts:
        chunk = 5_000
        for lo in range(0, accounts, chunk):
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(
                    """
                    INSERT INTO metering_dailyusage (account_id, day, sku, resource_id, labels, quantity, amount)
                    SELECT a.id, %(start)s::timestamptz + d * interval '1 day', s.sku, 'res-' || (a.n + d) %% 3,
                           jsonb_build_object('project', 'p' || (a.n + d) %% 4), q.quantity,
                           q.quantity * s.price * CASE WHEN a.n %% 4 = 3 THEN 1.1 ELSE 1 END
                    FROM invbench_accounts a
                    CROSS JOIN generate_series(0, %(days)s - 1) d
                    CROSS JOIN unnest(%(skus)s::text[], %(prices)s::numeric[]) s(sku, price)
                    CROSS JOIN LATERAL (SELECT ((hashint8(a.n * 40 + d) & 4095) / 7.0)::numeric(38, 12) AS quantity) q
                    WHERE a.n >= %(lo)s AND a.n < %(hi)s
                    ON CONFLICT DO NOTHING
                    """,
                    {
                        "start": f"{PERIOD}-01T00:00:00Z",
                        "days": days,
                        "skus": [s for s, _ in SKUS],
                        "prices": [p for _, p in SKUS],
                        "lo": lo,
                        "hi": lo + chunk,
                    },
                )
    with connection.cursor() as cur:
        cur.execute("ANALYZE metering_dailyusage")
        # Earlier bench runs' invoices go (this is the bench database; the ledger trigger does
        # not stop TRUNCATE).
        cur.execute(
            "TRUNCATE invoicing_invoice, invoicing_documentsequence, invoicing_ledgerentry, invoicing_creditgrant, "
            "invoicing_contractdiscount, invoicing_billinglock CASCADE"
        )
        # A tenth of the accounts have credit, a twentieth a discount on compute.
        cur.execute(
            """
            INSERT INTO invoicing_creditgrant
                (id, account_id, kind, currency, amount_minor, remaining_minor, expires_at, reason, granted_by,
                 created_at)
            SELECT a.id, a.id, 'promotional', b.currency, 2500, 2500, NULL, 'bench', 'bench', now()
            FROM invbench_accounts a JOIN accounts_billingaccount b ON b.id = a.id WHERE a.n %% 10 = 0
            """,
            [],
        )
        cur.execute(
            """
            INSERT INTO invoicing_ledgerentry (account_id, source_type, source_id, currency, memo, posted_at)
            SELECT account_id, 'credit_grant', id, currency, 'bench credit', now() FROM invoicing_creditgrant
            """
        )
        cur.execute(
            """
            INSERT INTO invoicing_ledgerline (entry_id, account_id, ledger_account, currency, amount_minor)
            SELECT e.id, NULL, 'promotions', e.currency, 2500 FROM invoicing_ledgerentry e
            UNION ALL SELECT e.id, e.account_id, 'customer_credit', e.currency, -2500 FROM invoicing_ledgerentry e
            """
        )
        cur.execute(
            """
            INSERT INTO invoicing_contractdiscount
                (account_id, sku_prefix, percent, valid_from, valid_until, reason, created_by, created_at)
            SELECT id, 'compute.', 12.5, '2026-10-10', NULL, 'bench', 'bench', now()
            FROM invbench_accounts WHERE n %% 20 = 1
            """,
            [],
        )
    print(f"prepared {accounts:,} accounts x {len(SKUS)} SKUs x {days} days in {time.perf_counter() - started:.1f} s")


def close_worker(url: str, shards: list[int], out: Any) -> None:
    """What a Celery worker does with its share of a fanned-out close's shard tasks."""
    setup_django(url)
    from billing_site.common.actors import Actor
    from invoicing import services
    from invoicing.periods import Period

    issued = 0
    for shard in shards:
        report = services.period_close_shard(
            period=Period.parse(PERIOD), shard=shard, actor=Actor.system("bench"), render_pdfs=False
        )
        issued += report.issued
    out.put(issued)


def close_with_workers(url: str, workers: int) -> int:
    """The close fanned out over ``workers`` processes taking the shards in turn; invoices issued."""
    from metering.selectors import shard_count

    context = mp.get_context("spawn")
    out = context.Queue()
    shards = list(range(shard_count()))
    processes = [context.Process(target=close_worker, args=(url, shards[i::workers], out)) for i in range(workers)]
    for process in processes:
        process.start()
    issued = sum(out.get() for _ in processes)
    for process in processes:
        process.join()
        if process.exitcode:
            raise SystemExit(f"a close worker failed ({process.exitcode})")
    return issued


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accounts", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=30, help="days of rated usage per SKU in the month")
    parser.add_argument("--chunk-size", type=int, default=500, help="accounts per transaction (--workers 1)")
    parser.add_argument("--pdfs", type=int, default=20, help="invoices whose PDF rendering is timed")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes billing chunks in parallel, as Celery workers do (1: inline)"
    )
    args = parser.parse_args()

    url = database_url()
    setup_django(url)
    prepare(args.accounts, args.days)

    from billing_site.common.actors import Actor
    from invoicing import ledger, pdf, services
    from invoicing.models import Invoice, InvoiceLine
    from invoicing.periods import Period

    period = Period.parse(PERIOD)
    actor = Actor.system("bench")
    started = time.perf_counter()
    if args.workers > 1:
        issued = close_with_workers(url, args.workers)
        how = f"{args.workers} workers taking the 16 shards in turn, chunks of <= 500 accounts"
    else:
        report = services.period_close(
            period=period, actor=actor, run_rollup=False, render_pdfs=False, chunk_size=args.chunk_size
        )
        issued, how = report.issued, f"inline, chunks of {args.chunk_size} accounts"
    seconds = time.perf_counter() - started
    rate = issued / seconds if seconds else 0.0
    lines = InvoiceLine.objects.filter(invoice__period_start=period.start).count()
    print(
        f"INVOICING: {issued:,} invoices ({lines:,} lines) issued in {seconds:.1f} s = {rate:,.0f} invoices/s "
        f"({how}; target >= 1,000/s: {'met' if rate >= 1000 else 'NOT met'})"
    )
    if issued != args.accounts:
        raise SystemExit(f"expected {args.accounts} invoices, issued {issued}")

    started = time.perf_counter()
    problems = ledger.check()
    print(f"ledger check: {'ok' if not problems else problems[:5]} ({time.perf_counter() - started:.1f} s)")
    if problems:
        raise SystemExit("the ledger check failed")

    started = time.perf_counter()
    again = services.period_close(
        period=period, actor=actor, run_rollup=False, render_pdfs=False, chunk_size=args.chunk_size
    )
    seconds = time.perf_counter() - started
    print(f"re-run: {again.issued} issued, {again.already_issued:,} already invoiced ({seconds:.1f} s)")
    if again.issued:
        raise SystemExit("a re-run issued invoices again")

    timings = []
    for invoice in Invoice.objects.filter(period_start=period.start).order_by("number")[: args.pdfs]:
        started = time.perf_counter()
        content = pdf.render(pdf.invoice_html(invoice))
        timings.append(time.perf_counter() - started)
        assert content.startswith(b"%PDF-")
    if timings:
        print(
            f"PDF rendering: {len(timings)} invoices, median {statistics.median(timings) * 1000:.0f} ms, "
            f"max {max(timings) * 1000:.0f} ms per invoice ({1 / statistics.median(timings):.1f}/s on one core)"
        )


if __name__ == "__main__":
    main()
