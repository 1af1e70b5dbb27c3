"""Invoices, credit notes, credits, taxes, numbering and the ledger.

Money on documents is stored as integers in the currency's minor unit (``*_minor``; the
exponent comes from ISO 4217, ``billing_site.common.money``). Quantities and the rated usage
behind a line keep full precision (``Decimal`` with 12 places). Every table carries
``account_id`` (the shard key) and leads its hot indexes with it.
"""

from __future__ import annotations

import datetime as dt

from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateRangeField, RangeOperators
from django.db import models
from django.db.models import Func, Q
from django.utils import timezone
from django_countries.fields import CountryField
from django_fsm import FSMField, FSMModelMixin, can_proceed, transition

from billing_site.common import ids, money
from billing_site.common.audit import tracked
from billing_site.common.transitions import AuditedTransitions, StateChangeRecord


class InvoiceStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ISSUED = "issued", "Issued"
    PAID = "paid", "Paid"
    UNCOLLECTIBLE = "uncollectible", "Uncollectible (written off)"
    VOID = "void", "Void"


class InvoiceKind(models.TextChoices):
    PERIOD = "period", "Monthly invoice"
    THRESHOLD = "threshold", "Threshold invoice (credit limit reached)"


class TaxTreatment(models.TextChoices):
    DOMESTIC = "domestic", "Domestic VAT"
    OSS = "oss", "EU VAT of the customer's country (OSS)"
    REVERSE_CHARGE = "reverse_charge", "Reverse charge"
    OUTSIDE_EU = "outside_eu", "Outside the scope of EU VAT"


class DateRange(Func):
    """PostgreSQL's ``daterange(lower, upper, '[)')``: a validity from ``lower`` (inclusive) to
    ``upper`` (exclusive; NULL: open-ended)."""

    function = "daterange"
    output_field = DateRangeField()

    def __init__(self, lower: str, upper: str) -> None:
        super().__init__(models.F(lower), models.F(upper), models.Value("[)"))


class TaxRateKind(models.TextChoices):
    STANDARD = "standard", "Standard rate"


@tracked(account=None)
class TaxRate(models.Model):
    """A member state's VAT rate of a kind (the standard rate) from ``valid_from`` (inclusive)
    until ``valid_until`` (exclusive; empty: until further notice). Rates of one country and
    kind never overlap (an exclusion constraint in the model; in the database a trigger with the
    same name and error, migration 0010): on any day exactly one is in force, or none.
    Finance writes them through ``invoicing.services`` (the admin calls it): a new rate closes
    the open-ended one before it only when told to, every change is audited (``TermsChange``),
    and no change may alter the rate of a day an issued invoice was taxed on."""

    country = CountryField()
    kind = models.CharField(
        max_length=16, choices=TaxRateKind.choices, default=TaxRateKind.STANDARD, db_default=TaxRateKind.STANDARD
    )
    rate = models.DecimalField(max_digits=5, decimal_places=2, help_text="Percent, e.g. 21.00")
    valid_from = models.DateField()
    valid_until = models.DateField(null=True, blank=True, help_text="Exclusive; empty: until further notice")
    note = models.CharField(max_length=200, blank=True, default="")

    class Meta:
        constraints = [
            ExclusionConstraint(
                name="invoicing_taxrate_no_overlap",
                expressions=[
                    ("country", RangeOperators.EQUAL),
                    ("kind", RangeOperators.EQUAL),
                    (DateRange("valid_from", "valid_until"), RangeOperators.OVERLAPS),
                ],
                violation_error_message="Another rate of this country and kind is in force in this period.",
            ),
            models.CheckConstraint(condition=Q(rate__gte=0, rate__lt=100), name="invoicing_taxrate_range"),
            models.CheckConstraint(
                condition=Q(valid_until__isnull=True) | Q(valid_until__gt=models.F("valid_from")),
                name="invoicing_taxrate_period",
            ),
        ]
        ordering = ["country", "-valid_from"]

    def __str__(self) -> str:
        until = f" until {self.valid_until}" if self.valid_until else ""
        return f"{self.country} {self.rate}% from {self.valid_from}{until}"


class TermsSubject(models.TextChoices):
    TAX_RATE = "tax_rate", "Tax rate"
    CONTRACT_DISCOUNT = "contract_discount", "Contract discount"


class TermsChange(models.Model):
    """Append-only audit of finance's changes to the terms invoices are planned with (tax
    rates, contract discounts): what, who, when, why, and the row before and after. Written
    by the services in the change's transaction."""

    subject = models.CharField(max_length=32, choices=TermsSubject.choices)
    subject_id = models.BigIntegerField()
    account_id = models.BigIntegerField(null=True, blank=True)  # a contract discount's account
    action = models.CharField(max_length=16)  # create | update | close | delete
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    actor_kind = models.CharField(max_length=16)
    actor_name = models.CharField(max_length=254)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["subject", "subject_id", "created_at"], name="invoicing_terms_subject")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.subject} {self.subject_id}: {self.action}"


@tracked(account="account_id")
class ContractDiscount(models.Model):
    """A negotiated discount: ``percent`` off the rated amount of SKUs whose code starts with
    ``sku_prefix`` (``compute.``), for usage on days in [valid_from, valid_until)."""

    account_id = models.BigIntegerField(db_index=True)
    sku_prefix = models.CharField(max_length=64, help_text="e.g. compute. (empty: every SKU)", blank=True)
    percent = models.DecimalField(max_digits=5, decimal_places=2)
    valid_from = models.DateField()
    valid_until = models.DateField(null=True, blank=True, help_text="Exclusive; empty: open-ended")
    reason = models.CharField(max_length=200)
    created_by = models.CharField(max_length=254, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(percent__gt=0, percent__lte=100), name="invoicing_discount_percent"),
            models.CheckConstraint(
                condition=Q(valid_until__isnull=True) | Q(valid_until__gt=models.F("valid_from")),
                name="invoicing_discount_period",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.percent}% on {self.sku_prefix or '*'}"


class DiscountedUsage(models.Model):
    """What an issued invoice discounted of a month's usage under one contract discount: the
    rated base it took (the usage in the discount's days of that month, its SKUs) and the
    minor units it gave. Like ``BilledUsage`` for usage, it lets a later invoice discount
    only what is left, so each month's discount is given exactly once in any closing order."""

    account_id = models.BigIntegerField()
    discount = models.ForeignKey(ContractDiscount, on_delete=models.PROTECT, related_name="+")
    usage_month = models.DateField()
    invoice = models.ForeignKey("Invoice", on_delete=models.PROTECT, related_name="+")
    base_amount = models.DecimalField(max_digits=38, decimal_places=12)
    amount_minor = models.BigIntegerField()  # negative: a discount

    class Meta:
        verbose_name_plural = "discounted usage"
        constraints = [
            models.UniqueConstraint(
                fields=["account_id", "discount", "usage_month", "invoice"], name="invoicing_discountedusage_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)} {self.usage_month:%Y-%m} discount {self.discount_id}"


class BillingLock(models.Model):
    """One row per billed account, locked ``FOR UPDATE`` while the account is being invoiced:
    two period closes (of the same or different months) never bill one account at once.
    Row locks live in the tuples, so a chunk of thousands of accounts does not fill the
    server's shared lock table the way as many advisory locks would."""

    account_id = models.BigIntegerField(primary_key=True)

    def __str__(self) -> str:
        return str(self.account_id)


class DocumentSequence(models.Model):
    """The last number handed out in a series for a calendar year. Numbers are taken by an
    ``UPDATE … RETURNING`` in the issuing transaction: the row lock serialises issuers and a
    rollback gives the numbers back, so a series has no gaps and no duplicates."""

    series = models.CharField(max_length=16)
    year = models.PositiveSmallIntegerField()
    last_number = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["series", "year"], name="invoicing_sequence_unique")]

    def __str__(self) -> str:
        return f"{self.series}-{self.year}: {self.last_number}"


def _nothing_paid(invoice: models.Model) -> bool:
    return isinstance(invoice, Invoice) and invoice.amount_paid_minor == 0


@tracked(account="account_id", exclude=("buyer", "seller"))
class Invoice(AuditedTransitions, FSMModelMixin, models.Model):
    """One invoice per account and calendar month (``period_start`` first day, ``period_end``
    the first day of the next month, exclusive). Money in integer minor units of ``currency``.

    Besides the month's own (``kind`` period, unique per account and month), an account whose
    unbilled usage and unpaid invoices pass its credit limit gets threshold invoices during
    the month: the usage rated so far, from ``period_start`` to ``period_end`` (the day after
    the issue), numbered in the same series; the month's invoice then bills only the rest.

    A draft has no number and may be recomputed; issuing freezes it: number, amounts, lines,
    tax decision and a snapshot of both parties. ``status`` moves only through transitions."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    period_start = models.DateField()
    period_end = models.DateField()
    kind = models.CharField(
        max_length=16, choices=InvoiceKind.choices, default=InvoiceKind.PERIOD, db_default=InvoiceKind.PERIOD
    )
    status = FSMField(default=InvoiceStatus.DRAFT, choices=InvoiceStatus.choices, protected=True)
    currency = models.CharField(max_length=3)
    number = models.CharField(max_length=32, null=True, blank=True, unique=True)
    subtotal_minor = models.BigIntegerField(default=0)
    tax_rate = models.DecimalField(max_digits=5, decimal_places=2, default=0, help_text="Percent")
    tax_country = models.CharField(max_length=2, blank=True, default="")
    tax_treatment = models.CharField(max_length=16, choices=TaxTreatment.choices, blank=True, default="")
    tax_note = models.CharField(max_length=200, blank=True, default="")
    tax_minor = models.BigIntegerField(default=0)
    total_minor = models.BigIntegerField(default=0)
    credits_applied_minor = models.BigIntegerField(default=0)
    amount_paid_minor = models.BigIntegerField(default=0)
    amount_credited_minor = models.BigIntegerField(default=0, help_text="Credit notes against this invoice")
    written_off_minor = models.BigIntegerField(default=0)
    # Money given back after a credit note: to the card, or kept as customer credit (``refunds``).
    amount_refunded_minor = models.BigIntegerField(
        default=0, db_default=0, help_text="Given back: to the card or as credit"
    )
    payment_terms_days = models.PositiveSmallIntegerField(default=14)
    buyer = models.JSONField(default=dict, blank=True, help_text="Snapshot when issued")
    seller = models.JSONField(default=dict, blank=True, help_text="Snapshot when issued")
    created_at = models.DateTimeField(default=timezone.now)
    issued_at = models.DateTimeField(null=True, blank=True)
    due_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account_id", "period_start"],
                condition=Q(kind="period"),
                name="invoicing_invoice_account_period",
            ),
            models.CheckConstraint(
                condition=Q(status=InvoiceStatus.DRAFT, number__isnull=True)
                | (~Q(status=InvoiceStatus.DRAFT) & Q(number__isnull=False, issued_at__isnull=False)),
                name="invoicing_invoice_number_iff_issued",
            ),
            models.CheckConstraint(
                condition=Q(
                    credits_applied_minor__gte=0,
                    amount_paid_minor__gte=0,
                    amount_credited_minor__gte=0,
                    amount_refunded_minor__gte=0,
                ),
                name="invoicing_invoice_amounts_not_negative",
            ),
        ]
        indexes = [
            models.Index(fields=["account_id", "-created_at"], name="invoicing_invoice_account"),
            models.Index(fields=["status", "due_at"], name="invoicing_invoice_status_due"),
            models.Index(fields=["period_start", "status"], name="invoicing_invoice_period"),
            # The last period close's progress (the staff home page, /metrics): the newest month,
            # its monthly invoices by status and the last issued, read from the index alone.
            models.Index(
                fields=["period_start", "status", "issued_at"],
                condition=Q(kind="period"),
                name="invoicing_invoice_closed",
            ),
            # Which issued invoices a change of a country's VAT rate would touch.
            models.Index(fields=["tax_country", "period_end"], name="invoicing_invoice_tax_point"),
            # Finance's receivables ageing: the issued invoices only, with every column the
            # ageing reads (an index-only scan at 10,000,000 invoices, ``selectors.receivables_ageing``).
            models.Index(
                fields=["currency", "due_at"],
                include=[
                    "account_id",
                    "total_minor",
                    "credits_applied_minor",
                    "amount_paid_minor",
                    "amount_credited_minor",
                    "written_off_minor",
                    "amount_refunded_minor",
                ],
                condition=Q(status="issued"),
                name="invoicing_invoice_receivable",
            ),
            # Revenue invoiced in a month (``selectors.revenue``): covering, so a month of a
            # million invoices is summed from the index alone (the heap is ten times that).
            models.Index(
                fields=["issued_at"], include=["currency", "status", "total_minor"], name="invoicing_invoice_revenue"
            ),
        ]
        permissions = [
            ("close_period", "Can run a period close (billing run)"),
            ("write_off_invoice", "Can write invoices off as uncollectible"),
            ("issue_credit_note", "Can issue credit notes and void invoices"),
            ("view_receivables", "Can view the receivables ageing, dunning funnel and revenue"),
        ]

    def __str__(self) -> str:
        return self.number or f"draft {self.public_id}"

    @property
    def public_id(self) -> str:
        return ids.encode("inv", self.id)

    @property
    def tax_point(self) -> dt.date:
        """The day whose VAT rate the invoice charges: the period's last day (a threshold
        invoice's period ends the day after its issue, so: its issue day)."""
        return self.period_end - dt.timedelta(days=1)

    @property
    def amount_due_minor(self) -> int:
        return max(0, self.total_minor - self.credits_applied_minor)

    @property
    def balance_minor(self) -> int:
        """What the invoice leaves on the customer's receivable: due, less what was paid,
        credited by credit notes and written off, plus what was given back (refunded to the
        card or kept as credit). Negative would mean more was received or credited than owed:
        the services settle such an excess to customer credit in the same transaction, so it
        never stays negative on an issued, paid or written-off invoice (a void invoice gives
        its spent credit back to the grants instead)."""
        return (
            self.amount_due_minor
            - self.amount_paid_minor
            - self.amount_credited_minor
            - self.written_off_minor
            + self.amount_refunded_minor
        )

    @property
    def amount_outstanding_minor(self) -> int:
        """What the customer still owes on this invoice (never below zero)."""
        return max(0, self.balance_minor)

    # --- Lifecycle: state only. ``invoicing.services`` locks and posts the ledger around them.

    @transition(field=status, source=InvoiceStatus.DRAFT, target=InvoiceStatus.ISSUED)
    def issue(self) -> None:
        """Frozen from now on; numbered."""

    @transition(field=status, source=InvoiceStatus.ISSUED, target=InvoiceStatus.PAID)
    def mark_paid(self) -> None:
        """Nothing outstanding any more."""

    @transition(field=status, source=InvoiceStatus.ISSUED, target=InvoiceStatus.UNCOLLECTIBLE)
    def write_off(self) -> None:
        """Finance gives up on the outstanding amount."""

    @transition(field=status, source=InvoiceStatus.ISSUED, target=InvoiceStatus.VOID, conditions=[_nothing_paid])
    def void(self) -> None:
        """Cancelled together with a credit note for the whole amount; only while nothing was
        paid on it (money received is given back with credit notes and refunds instead)."""

    # --- Moved by ``billing_site.common.transitions`` (locked, re-checked, audited, logged).

    TRANSITION_LOG = "invoicing.invoice_transition"

    def log_fields(self) -> dict[str, object]:
        return {
            "invoice_id": self.public_id,
            "account_id": ids.encode("acc", self.account_id),
            "number": self.number,
            "kind": self.kind,
        }

    # --- What may be done with it: the services enforce these, the admin offers what they allow.

    def can_void(self) -> bool:
        return can_proceed(self.void)

    def can_write_off(self) -> bool:
        return can_proceed(self.write_off)

    def can_credit(self) -> bool:
        """A credit note needs an issued or paid invoice."""
        return self.status in (InvoiceStatus.ISSUED, InvoiceStatus.PAID)

    def can_refund(self) -> bool:
        """Money paid on it may go back (with a credit note) once issued, paid or written off."""
        return self.status in (InvoiceStatus.ISSUED, InvoiceStatus.PAID, InvoiceStatus.UNCOLLECTIBLE)


class InvoiceTransition(StateChangeRecord):
    """Append-only audit of invoice state changes, written in the transition's transaction."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="transitions")
    from_state = models.CharField(max_length=16, choices=InvoiceStatus.choices)
    to_state = models.CharField(max_length=16, choices=InvoiceStatus.choices)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="invoicing_it_account")]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{ids.encode('inv', self.invoice_id)}: {self.from_state} → {self.to_state}"


class LineKind(models.TextChoices):
    USAGE = "usage", "Usage"
    ADJUSTMENT = "adjustment", "Usage adjustment for an earlier period"
    DISCOUNT = "discount", "Contract discount"


class InvoiceLine(models.Model):
    """A line: a SKU's usage in the period (or a late adjustment for an earlier one, or a
    discount). ``amount_minor`` is the rated amount rounded once; ``rated_amount`` keeps the
    full precision it came from. ``detail`` holds the breakdown by resource and project."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    account_id = models.BigIntegerField()
    position = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=16, choices=LineKind.choices)
    sku = models.CharField(max_length=64, blank=True, default="")
    # Written with the line (``planning.family_of``): revenue is posted and checked by it.
    revenue_family = models.CharField(max_length=64, default="general")
    usage_month = models.DateField(null=True, blank=True, help_text="The month whose usage this line bills")
    description = models.CharField(max_length=300)
    quantity = models.DecimalField(max_digits=38, decimal_places=12, null=True, blank=True)
    unit = models.CharField(max_length=32, blank=True, default="")
    # Decimal with up to 18 places per unit; empty when the price is tiered or changed in the period.
    unit_price = models.DecimalField(max_digits=38, decimal_places=18, null=True, blank=True)
    pricing = models.CharField(max_length=16, blank=True, default="", help_text="flat | tiered | varied")
    rated_amount = models.DecimalField(max_digits=38, decimal_places=12)
    amount_minor = models.BigIntegerField()
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["invoice", "position"], name="invoicing_line_unique")]
        ordering = ["invoice", "position"]

    def __str__(self) -> str:
        return self.description


class BilledUsage(models.Model):
    """What an issued invoice billed of a month's rated usage of a SKU (full precision, and
    the rounded amount charged). The next invoice bills the difference between the month's
    rated usage now and the sum of these rows: late usage lands exactly once, on the next
    invoice, as an adjustment."""

    account_id = models.BigIntegerField()
    usage_month = models.DateField()
    sku = models.CharField(max_length=64)
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="+")
    quantity = models.DecimalField(max_digits=38, decimal_places=12)
    rated_amount = models.DecimalField(max_digits=38, decimal_places=12)
    # What the line charged, in minor units: later adjustments bill round(month's rated total)
    # minus the sum of these, so rounding never drifts however the usage arrives.
    amount_minor = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["account_id", "usage_month", "sku", "invoice"], name="invoicing_billedusage_unique"
            )
        ]

    def __str__(self) -> str:
        return f"{ids.encode('acc', self.account_id)} {self.usage_month:%Y-%m} {self.sku}"


class CreditKind(models.TextChoices):
    PROMOTIONAL = "promotional", "Promotional"
    PREPAID = "prepaid", "Prepaid"
    # Written by the services only: money received beyond what an invoice owed (a payment
    # larger than the outstanding amount, or one arriving after the invoice was paid, voided
    # or written off), or a credit note on a paid invoice settled as credit.
    OVERPAYMENT = "overpayment", "Overpayment kept as credit"


# What finance may grant by hand (the admin, ``credit_grant_create``).
GRANTABLE_CREDIT_KINDS = (CreditKind.PROMOTIONAL, CreditKind.PREPAID)


@tracked(account="account_id")
class CreditGrant(models.Model):
    """Credit an account can spend on invoices in ``currency`` until ``expires_at``."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    kind = models.CharField(max_length=16, choices=CreditKind.choices)
    currency = models.CharField(max_length=3)
    amount_minor = models.BigIntegerField()
    remaining_minor = models.BigIntegerField()
    expires_at = models.DateTimeField(null=True, blank=True)
    reason = models.CharField(max_length=300)
    granted_by = models.CharField(max_length=254)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_minor__gt=0, remaining_minor__gte=0, remaining_minor__lte=models.F("amount_minor")),
                name="invoicing_grant_amounts",
            ),
        ]
        indexes = [models.Index(fields=["account_id", "currency", "expires_at"], name="invoicing_grant_account")]

    def __str__(self) -> str:
        if self.amount_minor is None:  # not written yet
            return f"{self.get_kind_display()} credit"
        return f"{self.get_kind_display()} credit of {money.display(self.amount_minor, self.currency)}"

    @property
    def public_id(self) -> str:
        return ids.encode("crg", self.id)


class CreditApplication(models.Model):
    """Credit spent on an invoice (``amount_minor`` > 0) or given back when the invoice is
    voided (< 0). The grant's ``remaining_minor`` moves in the same transaction."""

    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="applications")
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_applications")
    account_id = models.BigIntegerField()
    amount_minor = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="invoicing_ca_account")]

    def __str__(self) -> str:
        return f"{self.amount_minor} of {ids.encode('crg', self.grant_id)} on {ids.encode('inv', self.invoice_id)}"


@tracked(account="account_id")
class CreditNote(models.Model):
    """A credit note against an issued or paid invoice, numbered in its own gapless series.
    Money in minor units of the invoice's currency, taxed at the invoice's rate."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    account_id = models.BigIntegerField()
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_notes")
    number = models.CharField(max_length=32, unique=True)
    currency = models.CharField(max_length=3)
    reason = models.TextField()
    subtotal_minor = models.BigIntegerField()
    tax_minor = models.BigIntegerField()
    total_minor = models.BigIntegerField()
    issued_by = models.CharField(max_length=254)
    issued_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "-issued_at"], name="invoicing_cn_account"),
            models.Index(fields=["issued_at"], name="invoicing_cn_issued"),  # a month's credit notes
        ]
        constraints = [models.CheckConstraint(condition=Q(total_minor__gt=0), name="invoicing_cn_positive")]

    def __str__(self) -> str:
        return self.number

    @property
    def public_id(self) -> str:
        return ids.encode("crn", self.id)


class CreditNoteLine(models.Model):
    credit_note = models.ForeignKey(CreditNote, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveSmallIntegerField()
    description = models.CharField(max_length=300)
    sku = models.CharField(max_length=64, blank=True, default="")
    revenue_family = models.CharField(max_length=64, default="general")  # as on the invoice line it credits
    amount_minor = models.BigIntegerField(help_text="Net of tax, positive")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["credit_note", "position"], name="invoicing_cnline_unique")]
        ordering = ["credit_note", "position"]

    def __str__(self) -> str:
        return self.description


class InvoicePayment(models.Model):
    """Money received against an invoice, as reported by the payments app (``reference`` is
    the payment's id: the unique reference decides, so the same report twice records it
    once). ``received_minor`` arrived; ``amount_minor`` of it was applied to the invoice (at
    most what was outstanding, 0 when the invoice no longer took payments); the rest became
    customer credit (``credit_grant``, kind ``overpayment``): money received is never lost."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="payments")
    account_id = models.BigIntegerField()
    amount_minor = models.BigIntegerField(help_text="Applied to the invoice")
    received_minor = models.BigIntegerField(default=0, help_text="Received in all")
    currency = models.CharField(max_length=3)
    reference = models.CharField(max_length=128, unique=True)
    credit_grant = models.ForeignKey(
        "CreditGrant", on_delete=models.PROTECT, null=True, blank=True, related_name="+", help_text="The excess"
    )
    invoice_paid = models.BooleanField(default=False, help_text="The invoice was paid once this was recorded")
    received_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["account_id", "received_at"], name="invoicing_payment_account"),
            # A month's money in (``selectors.revenue``), from the index alone.
            models.Index(
                fields=["received_at"], include=["currency", "received_minor"], name="invoicing_payment_revenue"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(amount_minor__gte=0, received_minor__gt=0, amount_minor__lte=models.F("received_minor")),
                name="invoicing_payment_amounts",
            ),
            models.CheckConstraint(
                condition=Q(amount_minor=models.F("received_minor"), credit_grant__isnull=True)
                | Q(amount_minor__lt=models.F("received_minor"), credit_grant__isnull=False),
                name="invoicing_payment_excess_granted",
            ),
        ]

    def __str__(self) -> str:
        return self.reference


class RefundMethod(models.TextChoices):
    CARD = "card", "Refunded to the card"
    CREDIT = "credit", "Kept as customer credit"


class InvoiceRefund(models.Model):
    """Money given back on an invoice after a credit note: refunded to the card (the payments
    app refunded it at the gateway; ledger source ``refund``: receivable debit, gateway
    clearing credit), or kept as customer credit (``grant``, kind ``overpayment``; the
    grant's own ledger entry moves it from the receivable to customer credit). Either way
    the credit note's reduction of the receivable is matched, so none is left negative.
    ``reference`` is unique: the payments app's refund id, or ``settle:<credit note>``."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="refunds")
    account_id = models.BigIntegerField()
    amount_minor = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    method = models.CharField(max_length=8, choices=RefundMethod.choices)
    reference = models.CharField(max_length=128, unique=True)
    credit_note = models.ForeignKey(CreditNote, on_delete=models.PROTECT, related_name="refunds")
    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, null=True, blank=True, related_name="+")
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["account_id", "created_at"], name="invoicing_refund_account")]
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="invoicing_refund_positive"),
            models.CheckConstraint(
                condition=Q(method=RefundMethod.CARD, grant__isnull=True)
                | Q(method=RefundMethod.CREDIT, grant__isnull=False),
                name="invoicing_refund_method_grant",
            ),
        ]

    def __str__(self) -> str:
        return self.reference


class RenderedDocument(models.Model):
    """A PDF rendered once when its document was issued and kept as it was."""

    kind = models.CharField(max_length=16)  # "invoice" | "credit_note"
    source_id = models.BigIntegerField()
    account_id = models.BigIntegerField()
    pdf = models.BinaryField()
    sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["kind", "source_id"], name="invoicing_document_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.source_id}"


class LedgerSource(models.TextChoices):
    """What a ledger entry posts (``(source_type, source_id)`` is unique)."""

    INVOICE = "invoice", "Issued invoice"
    INVOICE_CREDIT = "invoice_credit", "Credit spent on an invoice"
    CREDIT_GRANT = "credit_grant", "Credit grant"
    PAYMENT = "payment", "Payment received"
    CREDIT_NOTE = "credit_note", "Credit note"
    CREDIT_REVERSAL = "credit_reversal", "Credit given back on a void"
    WRITE_OFF = "write_off", "Write-off"
    REFUND = "refund", "Refund to the card"
    DISPUTE_OPENED = "dispute_opened", "Dispute opened (funds withdrawn)"
    DISPUTE_WON = "dispute_won", "Dispute won (funds returned)"
    DISPUTE_LOST = "dispute_lost", "Dispute lost (chargeback)"


class LedgerEntry(models.Model):
    """One posting, append-only: its lines sum to zero. ``(source_type, source_id)`` is
    unique, so a source (an issued invoice, a payment …) posts at most once."""

    account_id = models.BigIntegerField(null=True, blank=True)
    source_type = models.CharField(max_length=32, choices=LedgerSource.choices)
    source_id = models.BigIntegerField()
    currency = models.CharField(max_length=3)
    memo = models.CharField(max_length=300, blank=True, default="")
    posted_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "ledger entries"
        constraints = [
            models.UniqueConstraint(fields=["source_type", "source_id"], name="invoicing_ledger_source_once"),
        ]
        indexes = [models.Index(fields=["account_id", "posted_at"], name="invoicing_ledger_account")]

    def __str__(self) -> str:
        return f"{self.source_type} {self.source_id}"


class LedgerLine(models.Model):
    """A debit (``amount_minor`` > 0) or credit (< 0) to a ledger account: ``receivable``,
    ``customer_credit``, ``disputes`` (per billing account), ``revenue:<sku family>``,
    ``vat_payable:<CC>``, ``gateway_clearing``, ``bad_debt``, ``promotions``,
    ``chargeback_loss`` (the table in ``invoicing.ledger``)."""

    entry = models.ForeignKey(LedgerEntry, on_delete=models.PROTECT, related_name="lines")
    account_id = models.BigIntegerField(null=True, blank=True)
    ledger_account = models.CharField(max_length=64)
    currency = models.CharField(max_length=3)
    amount_minor = models.BigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["account_id", "ledger_account"], name="invoicing_ll_account")]

    def __str__(self) -> str:
        return f"{self.ledger_account}: {money.display(self.amount_minor, self.currency)}"


class ApprovalKind(models.TextChoices):
    REFUND = "refund", "Refund to the card"
    CREDIT_GRANT = "credit_grant", "Credit grant"
    WRITE_OFF = "write_off", "Write-off"


class ApprovalStatus(models.TextChoices):
    PENDING = "pending", "Pending (awaits a second finance user)"
    APPROVED = "approved", "Approved (being carried out)"
    EXECUTED = "executed", "Approved and carried out"
    FAILED = "failed", "Approved; carrying it out failed"
    REJECTED = "rejected", "Rejected"


class ApprovalRequest(models.Model):
    """Four-eyes: a refund, credit grant or write-off above ``FOUR_EYES_THRESHOLDS`` asked for
    by one finance user and approved or rejected by another, both with their reasons.

    Approval claims the request (``pending`` → ``approved`` under its row lock: one approver
    wins, a double click or a second approver finds it decided), then carries the action out
    through the same service as below the threshold, with an id derived from the request
    (``execution_id``: the refund's or the grant's id), so that carrying it out again after a
    crash does it once. The database refuses an approver who is the requester
    (``invoicing_approval_not_self``). It lives here, in invoicing, because the invoicing admin
    (write-offs, grants) and the payments app (refunds) both create requests and only payments
    may import invoicing; ``payments.services.approval_approve`` carries every kind out."""

    id = models.BigIntegerField(primary_key=True, default=ids.new_id, editable=False)
    kind = models.CharField(max_length=16, choices=ApprovalKind.choices)
    status = models.CharField(max_length=16, choices=ApprovalStatus.choices, default=ApprovalStatus.PENDING)
    account_id = models.BigIntegerField()
    invoice_id = models.BigIntegerField(null=True, blank=True)
    payment_id = models.BigIntegerField(null=True, blank=True, help_text="The payments app's payment (refunds)")
    currency = models.CharField(max_length=3)
    amount_minor = models.BigIntegerField()
    params = models.JSONField(default=dict, blank=True, help_text="What the action needs besides the amount")
    reason = models.CharField(max_length=1000, help_text="The requester's")
    requested_by_id = models.BigIntegerField()
    requested_by = models.CharField(max_length=254)
    requested_at = models.DateTimeField(default=timezone.now)
    decided_by_id = models.BigIntegerField(null=True, blank=True)
    decided_by = models.CharField(max_length=254, blank=True, default="")
    decision_reason = models.CharField(max_length=1000, blank=True, default="")
    decided_at = models.DateTimeField(null=True, blank=True)
    execution_id = models.BigIntegerField(default=ids.new_id, help_text="The id the action's record gets")
    result = models.CharField(max_length=300, blank=True, default="", help_text="What was done, or why it failed")
    executed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount_minor__gt=0), name="invoicing_approval_positive"),
            models.CheckConstraint(
                condition=Q(decided_by_id__isnull=True) | ~Q(decided_by_id=models.F("requested_by_id")),
                name="invoicing_approval_not_self",
            ),
            models.CheckConstraint(
                condition=Q(status=ApprovalStatus.PENDING, decided_by_id__isnull=True)
                | (~Q(status=ApprovalStatus.PENDING) & Q(decided_by_id__isnull=False, decided_at__isnull=False)),
                name="invoicing_approval_decided_iff_not_pending",
            ),
            models.UniqueConstraint(fields=["execution_id"], name="invoicing_approval_execution_once"),
        ]
        indexes = [
            models.Index(fields=["status", "requested_at"], name="invoicing_approval_status"),
            models.Index(fields=["invoice_id"], name="invoicing_approval_invoice"),
            models.Index(fields=["payment_id"], name="invoicing_approval_payment"),
        ]
        permissions = [("decide_approvalrequest", "Can approve or reject four-eyes requests")]

    def __str__(self) -> str:
        amount = money.display(self.amount_minor, self.currency) if self.amount_minor is not None else "-"
        return f"{self.public_id}: {self.get_kind_display()} of {amount} ({self.status})"

    @property
    def public_id(self) -> str:
        return ids.encode("apr", self.id)
