"""Tax rates of one country and kind never overlap. In the model's state an exclusion
constraint (what forms and ``full_clean`` validate against); in the database a trigger that
takes a per-(country, kind) advisory lock and refuses an overlapping row with the same error
(SQLSTATE 23P01, the constraint's name), because an exclusion constraint on text columns needs
the btree_gist extension, which the embedded PostgreSQL of ``make demo`` does not ship. (Databases
migrated before this change have the btree_gist constraint itself: the same rule.) Rates that overlap today are resolved the way invoices have been taxed so
far (the rate starting last wins): each rate is ended where the next one of its country
starts, and the change is written to the new audit table (``TermsChange``)."""

from typing import Any

import django.contrib.postgres.constraints
import django.utils.timezone
import invoicing.models
from django.db import migrations, models


def end_overlapping_rates(apps: Any, schema_editor: Any) -> None:
    TaxRate = apps.get_model("invoicing", "TaxRate")
    TermsChange = apps.get_model("invoicing", "TermsChange")
    by_country: dict[str, list[Any]] = {}
    for rate in TaxRate.objects.order_by("country", "valid_from", "id"):
        by_country.setdefault(str(rate.country), []).append(rate)
    for rates in by_country.values():
        for rate, following in zip(rates, rates[1:], strict=False):
            if rate.valid_until is None or rate.valid_until > following.valid_from:
                before = str(rate.valid_until) if rate.valid_until else None
                rate.valid_until = following.valid_from
                rate.save(update_fields=["valid_until"])
                TermsChange.objects.create(
                    subject="tax_rate",
                    subject_id=rate.id,
                    action="close",
                    before={"valid_until": before},
                    after={"valid_until": str(following.valid_from)},
                    actor_kind="system",
                    actor_name="migration invoicing.0010",
                    reason=f"overlapped the rate from {following.valid_from}, which invoices have used since",
                )


NO_OVERLAP_TRIGGER = """
CREATE FUNCTION invoicing_taxrate_no_overlap() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One writer per country and kind at a time; the check below then sees every committed rate.
    PERFORM pg_advisory_xact_lock(hashtext('invoicing_taxrate:' || NEW.country || ':' || NEW.kind));
    IF EXISTS (
        SELECT 1 FROM invoicing_taxrate t
        WHERE t.country = NEW.country AND t.kind = NEW.kind AND t.id <> NEW.id
          AND daterange(t.valid_from, t.valid_until) && daterange(NEW.valid_from, NEW.valid_until)
    ) THEN
        RAISE EXCEPTION 'conflicting key value violates exclusion constraint "invoicing_taxrate_no_overlap"'
            USING ERRCODE = 'exclusion_violation', CONSTRAINT = 'invoicing_taxrate_no_overlap',
                  TABLE = 'invoicing_taxrate';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER invoicing_taxrate_no_overlap BEFORE INSERT OR UPDATE ON invoicing_taxrate
    FOR EACH ROW EXECUTE FUNCTION invoicing_taxrate_no_overlap();
"""
DROP_NO_OVERLAP_TRIGGER = """
DROP TRIGGER IF EXISTS invoicing_taxrate_no_overlap ON invoicing_taxrate;
DROP FUNCTION IF EXISTS invoicing_taxrate_no_overlap();
"""


class Migration(migrations.Migration):

    dependencies = [
        ('invoicing', '0009_threshold_invoices'),
    ]

    operations = [
        migrations.CreateModel(
            name='TermsChange',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('subject', models.CharField(choices=[('tax_rate', 'Tax rate'), ('contract_discount', 'Contract discount')], max_length=32)),
                ('subject_id', models.BigIntegerField()),
                ('account_id', models.BigIntegerField(blank=True, null=True)),
                ('action', models.CharField(max_length=16)),
                ('before', models.JSONField(blank=True, null=True)),
                ('after', models.JSONField(blank=True, null=True)),
                ('actor_kind', models.CharField(max_length=16)),
                ('actor_name', models.CharField(max_length=254)),
                ('reason', models.TextField(blank=True, default='')),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['-created_at', '-id'],
            },
        ),
        migrations.RemoveConstraint(
            model_name='taxrate',
            name='invoicing_taxrate_unique',
        ),
        migrations.AddField(
            model_name='taxrate',
            name='kind',
            field=models.CharField(choices=[('standard', 'Standard rate')], db_default='standard', default='standard', max_length=16),
        ),
        migrations.AlterField(
            model_name='taxrate',
            name='valid_until',
            field=models.DateField(blank=True, help_text='Exclusive; empty: until further notice', null=True),
        ),
        migrations.AddIndex(
            model_name='invoice',
            index=models.Index(fields=['tax_country', 'period_end'], name='invoicing_invoice_tax_point'),
        ),
        migrations.RunPython(end_overlapping_rates, migrations.RunPython.noop),
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AddConstraint(
                    model_name='taxrate',
                    constraint=django.contrib.postgres.constraints.ExclusionConstraint(expressions=[('country', '='), ('kind', '='), (invoicing.models.DateRange('valid_from', 'valid_until'), '&&')], name='invoicing_taxrate_no_overlap', violation_error_message='Another rate of this country and kind is in force in this period.'),
                ),
            ],
            database_operations=[migrations.RunSQL(NO_OVERLAP_TRIGGER, DROP_NO_OVERLAP_TRIGGER)],
        ),
        migrations.AddIndex(
            model_name='termschange',
            index=models.Index(fields=['subject', 'subject_id', 'created_at'], name='invoicing_terms_subject'),
        ),
    ]
