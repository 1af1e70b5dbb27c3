"""What the invoicing app tells whoever listens (it imports neither payments nor antifraud).

``ledger_checking`` is sent by ``ledger.check`` inside its consistent snapshot (REPEATABLE
READ): each receiver returns a list of violations (sentences, empty when all hold) of the
invariants its app keeps about the money the ledger records — the payments app checks, per
payment, that refunds and disputes never exceed what was captured. ``manage.py ledger_check``
reports them with the ledger's own."""

from django.dispatch import Signal

# kwargs: none; each receiver returns list[str]
ledger_checking = Signal()
