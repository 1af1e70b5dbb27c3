"""The audit trail's triggers on set-based writes, on vs off, in one run.

    .venv/bin/python -m bench.audit_triggers postgres://postgres@127.0.0.1:5432/bench_invoicing 1500

On a database the invoicing benchmark filled: an UPDATE that changes N invoices, and an INSERT
of N billing accounts (copies of existing ones under new ids), each in a transaction that is
rolled back, once with the audit triggers and once without them (``ALTER TABLE … DISABLE
TRIGGER`` inside the same rolled-back transaction), alternating the order, six rounds; the
medians and their ratio. The full period close is measured by ``bench.invoicing``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import uuid

import psycopg

ACCOUNT_COLUMNS = (
    "name, email, kind, country, currency, tax_id, phone, address_line1, address_line2, address_city, "
    "address_postal_code, address_region, state, state_cause, credit_limit, payment_terms_days, created_at, "
    "updated_at"
)
TRIGGERS = "SELECT tgname FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname LIKE 'pgtrigger_%%'"


def main() -> None:
    url = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
    timings: dict[str, list[float]] = {"update_on": [], "update_off": [], "insert_on": [], "insert_off": []}
    metadata = json.dumps({"actor_kind": "system", "actor": "bench.audit_triggers"})
    with psycopg.connect(url) as conn:
        triggers = {
            table: [row[0] for row in conn.execute(TRIGGERS, (table,))]
            for table in ("invoicing_invoice", "accounts_billingaccount")
        }
        conn.rollback()
        for round_ in range(6):
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                with conn.transaction(force_rollback=True):
                    if not on:
                        for table, names in triggers.items():
                            for name in names:
                                conn.execute(f'ALTER TABLE {table} DISABLE TRIGGER "{name}"')
                    conn.execute(
                        "SELECT set_config('pghistory.context_id', %s, true), "
                        "set_config('pghistory.context_metadata', %s, true)",
                        (str(uuid.uuid4()), metadata),
                    )
                    started = time.perf_counter()
                    conn.execute(
                        "UPDATE invoicing_invoice SET tax_note = tax_note || '.' "
                        "WHERE id IN (SELECT id FROM invoicing_invoice ORDER BY id LIMIT %s)",
                        (n,),
                    )
                    timings["update_on" if on else "update_off"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    conn.execute(
                        f"INSERT INTO accounts_billingaccount (id, {ACCOUNT_COLUMNS}) "
                        f"SELECT a.id + 1, {ACCOUNT_COLUMNS} FROM accounts_billingaccount a "
                        "WHERE a.id %% 2 = 0 "
                        "AND NOT EXISTS (SELECT 1 FROM accounts_billingaccount b WHERE b.id = a.id + 1) "
                        "ORDER BY a.id LIMIT %s",
                        (n,),
                    )
                    timings["insert_on" if on else "insert_off"].append(time.perf_counter() - started)
    for name, values in timings.items():
        runs = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"{name}: median {statistics.median(values) * 1000:.0f} ms ({runs})")
    for write in ("update", "insert"):
        with_, without = statistics.median(timings[f"{write}_on"]), statistics.median(timings[f"{write}_off"])
        per_row = (with_ - without) / n * 1000
        print(f"{write} of {n} rows: triggers on/off = {with_ / without:.2f} ({per_row:.3f} ms a row)")


if __name__ == "__main__":
    main()
