"""One timeline of everything that happened to a customer, newest first.

A timeline is a list of ``Entry(moment, kind, text, link)`` gathered from *sources*: functions
that take what the customer page already loaded (``Loaded``: the account and each section's
rows, read through the apps' selectors) and yield entries. A new source (the audit trail, say)
is one more function in ``SOURCES`` (or passed to ``build``); it may read more through a
selector of its own, by ``loaded.account.id``. Sources never write and never see request data.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.urls import reverse

from billing_site.common import ids, money


@dataclass(frozen=True, slots=True)
class Entry:
    moment: dt.datetime
    kind: str  # transition, profile, invoice, payment, refund, dispute, dunning, risk, note …
    text: str
    link: str = ""


@dataclass
class Loaded:
    """What the customer page read, for the sources to reuse (no second query for the same rows)."""

    account: Any
    transitions: list[Any] = field(default_factory=list)
    profile_changes: list[Any] = field(default_factory=list)
    notes: list[Any] = field(default_factory=list)
    invoices: list[Any] = field(default_factory=list)
    credit_notes: list[Any] = field(default_factory=list)
    grants: list[Any] = field(default_factory=list)
    payments: list[Any] = field(default_factory=list)
    refunds: list[Any] = field(default_factory=list)
    disputes: list[Any] = field(default_factory=list)
    dunning_steps: list[Any] = field(default_factory=list)
    assessments: list[Any] = field(default_factory=list)
    decisions: list[Any] = field(default_factory=list)


Source = Callable[[Loaded], Iterable[Entry]]


def _admin(name: str, pk: int) -> str:
    return reverse(f"admin:{name}_change", args=[pk])


def transitions(loaded: Loaded) -> Iterable[Entry]:
    for t in loaded.transitions:
        reason = f": {t.reason}" if t.reason else ""
        yield Entry(
            t.created_at,
            "transition",
            f"{t.transition.capitalize()} ({t.from_state} → {t.to_state}) by {t.actor_name}{reason}",
        )


def profile_changes(loaded: Loaded) -> Iterable[Entry]:
    for change in loaded.profile_changes:
        fields = "; ".join(f"{f}: {c['before'] or '—'} → {c['after'] or '—'}" for f, c in change.changes.items())
        yield Entry(change.created_at, "profile", f"Profile changed by {change.actor_name}: {fields}")


def notes(loaded: Loaded) -> Iterable[Entry]:
    for note in loaded.notes:
        yield Entry(note.created_at, "note", f"Note by {note.author_name}: {note.text}")


def invoices(loaded: Loaded) -> Iterable[Entry]:
    for invoice in loaded.invoices:
        link = _admin("invoicing_invoice", invoice.id)
        amount = money.display(invoice.total_minor, invoice.currency)
        if invoice.issued_at:
            yield Entry(invoice.issued_at, "invoice", f"Invoice {invoice.number} issued: {amount}", link)
        if invoice.paid_at:
            yield Entry(invoice.paid_at, "invoice", f"Invoice {invoice.number} paid", link)
    for note in loaded.credit_notes:
        yield Entry(
            note.issued_at,
            "credit_note",
            f"Credit note {note.number} on {note.invoice_number}: {money.display(note.total_minor, note.currency)}",
        )
    for grant in loaded.grants:
        yield Entry(
            grant.created_at,
            "credit",
            f"Credit granted ({grant.get_kind_display().lower()}): {money.display(grant.amount_minor, grant.currency)}"
            f" by {grant.granted_by}: {grant.reason}",
            _admin("invoicing_creditgrant", grant.id),
        )


def payments(loaded: Loaded) -> Iterable[Entry]:
    for p in loaded.payments:
        outcome = p.status + (f" ({p.decline_code})" if p.decline_code else "")
        yield Entry(
            p.completed_at or p.created_at,
            "payment",
            f"Payment {p.public_id} of {money.display(p.amount_minor, p.currency)}"
            f" for {ids.encode('inv', p.invoice_id)}: {outcome}",
            _admin("payments_payment", p.id),
        )
    for r in loaded.refunds:
        yield Entry(
            r.created_at,
            "refund",
            f"Refund {r.public_id} of {money.display(r.amount_minor, r.currency)} ({r.status})"
            f" by {r.requested_by}: {r.reason}",
            _admin("payments_refund", r.id),
        )
    for d in loaded.disputes:
        yield Entry(
            d.opened_at,
            "dispute",
            f"Dispute {d.public_id} opened: {money.display(d.amount_minor, d.currency)} ({d.reason})",
            _admin("payments_dispute", d.id),
        )
        if d.closed_at:
            yield Entry(d.closed_at, "dispute", f"Dispute {d.public_id} {d.status}", _admin("payments_dispute", d.id))


def dunning(loaded: Loaded) -> Iterable[Entry]:
    for step in loaded.dunning_steps:
        detail = f": {step.detail}" if step.detail else ""
        yield Entry(
            step.created_at, "dunning", f"Dunning {step.action} on {ids.encode('inv', step.invoice_id)}{detail}"
        )


def risk(loaded: Loaded) -> Iterable[Entry]:
    for a in loaded.assessments:
        yield Entry(
            a.created_at, "risk", f"Risk check at {a.get_checkpoint_display().lower()}: {a.decision} (score {a.score})"
        )
    for d in loaded.decisions:
        yield Entry(d.created_at, "risk", f"Review: {d.get_action_display().lower()} by {d.analyst_name}: {d.reason}")


SOURCES: list[Source] = [transitions, profile_changes, notes, invoices, payments, dunning, risk]


def build(loaded: Loaded, sources: Iterable[Source] = (), *, limit: int = 200) -> list[Entry]:
    """Every source's entries (``SOURCES`` and ``sources``), newest first (ties: by kind, text),
    at most ``limit``."""
    entries = [entry for source in (*SOURCES, *sources) for entry in source(loaded)]
    entries.sort(key=lambda e: (e.moment, e.kind, e.text), reverse=True)
    return entries[:limit]
