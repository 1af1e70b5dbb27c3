"""Seed the member states' standard VAT rates, and make the ledger append-only.

The trigger refuses UPDATE and DELETE on ledger entries and lines (TRUNCATE, for test
databases, stays possible): a correction is a new entry. Small tables, no locking concern.
"""

from __future__ import annotations

from typing import Any

from django.db import migrations

APPEND_ONLY = """
CREATE FUNCTION invoicing_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % on % refused (post a correcting entry instead)',
        TG_OP, TG_TABLE_NAME USING ERRCODE = 'restrict_violation';
END $$;
CREATE TRIGGER invoicing_ledgerentry_append_only BEFORE UPDATE OR DELETE ON invoicing_ledgerentry
    FOR EACH ROW EXECUTE FUNCTION invoicing_ledger_append_only();
CREATE TRIGGER invoicing_ledgerline_append_only BEFORE UPDATE OR DELETE ON invoicing_ledgerline
    FOR EACH ROW EXECUTE FUNCTION invoicing_ledger_append_only();
"""
DROP_APPEND_ONLY = """
DROP TRIGGER invoicing_ledgerline_append_only ON invoicing_ledgerline;
DROP TRIGGER invoicing_ledgerentry_append_only ON invoicing_ledgerentry;
DROP FUNCTION invoicing_ledger_append_only();
"""


def seed_rates(apps: Any, schema_editor: Any) -> None:
    from invoicing.taxes import seed_rates as seed

    seed(apps.get_model("invoicing", "TaxRate"))


class Migration(migrations.Migration):
    dependencies = [("invoicing", "0001_initial")]

    operations = [
        migrations.RunPython(seed_rates, migrations.RunPython.noop),
        migrations.RunSQL(APPEND_ONLY, DROP_APPEND_ONLY),
    ]
