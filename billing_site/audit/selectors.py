"""Reads of the audit trail: one record's history, an account's trail, the whole trail.

Each entry says what changed (field → before, after), who (the context's actor), why (its
reason) and from where (URL, task, command, writer). Before/after come from the record's
previous event in its event table: an update's event holds the row as it was written, the
one before it the row as it was."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.apps import apps
from django.db import models
from pghistory.models import Context

from billing_site.common import ids, money

IGNORED_FIELDS = frozenset({"updated_at"})


@dataclass(frozen=True, slots=True)
class TrailEntry:
    """One change to one record."""

    event: str  # "<event model label>:<pgh_id>", unique across the trail
    at: dt.datetime
    model: str  # the tracked model's label, e.g. "accounts.BillingAccount"
    kind: str  # its verbose name, e.g. "billing account"
    object_id: str
    public_id: str  # "acc_…" where the record has one, else its id
    action: str  # insert | update | delete
    changes: dict[str, tuple[Any, Any]]  # field → (before, after); an insert's before is None
    actor_kind: str
    actor: str
    reason: str
    context: dict[str, Any] = field(default_factory=dict)  # url, task, task_id, command, writer …
    currency: str = ""  # the record's own currency, where it has one: its amounts are shown in it

    @property
    def shown(self) -> dict[str, tuple[Any, Any]]:
        """``changes`` as people read them: amounts as money (``433.52 EUR``: minor units in the
        record's currency, a credit limit kept with 4 places at the currency's), other decimals
        without trailing zeros (a rate of ``21.0000`` is ``21``)."""
        return {
            name: (_shown(name, a, self.currency), _shown(name, b, self.currency))
            for name, (a, b) in self.changes.items()
        }

    @property
    def where(self) -> str:
        """Where the change came from, in a few words (a URL, a task, a command, a writer)."""
        c = self.context
        parts = [c.get("writer"), c.get("task") and f"task {c['task']}", c.get("command") and f"command {c['command']}"]
        if c.get("url"):
            parts.append(f"{c.get('method') or ''} {c['url']}".strip())
        return " · ".join(p for p in parts if p)


def event_models() -> list[type[models.Model]]:
    """Every audit event table (one per tracked model)."""
    return [m for m in apps.get_models() if getattr(m, "pgh_tracked_model", None) is not None and _is_event(m)]


def _is_event(model: type[models.Model]) -> bool:
    from pghistory.models import Event

    return issubclass(model, Event)


def event_model_for(model: type[models.Model]) -> type[models.Model] | None:
    for event_model in event_models():
        if event_model.pgh_tracked_model is model:  # type: ignore[attr-defined]
            return event_model
    return None


def _public_id(tracked: type[models.Model], pk: Any) -> str:
    """The id a person quotes (``acc_…``, ``inv_…``) where the record has one, else its pk."""
    try:
        public = getattr(tracked(pk=pk), "public_id", None)
    except Exception:
        public = None
    return str(public) if public else str(pk)


# Amounts in major units kept with more places than the currency's (the rest are ``*_minor``).
MAJOR_UNIT_AMOUNTS = frozenset({"credit_limit"})


def _shown(name: str, value: Any, currency: str) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if currency and name.endswith("_minor") and isinstance(value, int):
        return money.display(value, currency, grouped=True)
    if isinstance(value, Decimal):
        if currency and name in MAJOR_UNIT_AMOUNTS:
            return f"{Decimal(money.format_amount(value, currency)):,} {currency}"
        text = format(value.normalize(), "f")
        return f"{text} {currency}" if currency and "price" in name else text
    return value


def _entries(
    event_model: type[models.Model], events: Sequence[Any], contexts: dict[Any, dict[str, Any]]
) -> list[TrailEntry]:
    """Entries for ``events`` of one table, ordered by object then pgh_id, each diffed against
    the object's previous event among them (or its previous event in the table)."""
    tracked = event_model.pgh_tracked_model  # type: ignore[attr-defined]
    names = [f.attname for f in event_model._meta.concrete_fields if not f.name.startswith("pgh_")]
    names = [n for n in names if n not in IGNORED_FIELDS]
    previous: dict[Any, Any] = {}
    entries = []
    for event in events:
        obj_id = event.pgh_obj_id
        now = {n: getattr(event, n) for n in names}
        before = previous.get(obj_id)
        if event.pgh_label == "delete":
            changes = {n: (v, None) for n, v in now.items()}  # the row as it was when deleted
        elif event.pgh_label == "insert" or before is None:
            changes = {n: (None, v) for n, v in now.items()}
        else:
            changes = {n: (before[n], now[n]) for n in names if before[n] != now[n]}
        previous[obj_id] = now
        metadata = contexts.get(event.pgh_context_id, {})
        entries.append(
            TrailEntry(
                event=f"{event_model._meta.label}:{event.pgh_id}",
                at=event.pgh_created_at,
                model=tracked._meta.label,
                kind=str(tracked._meta.verbose_name),
                object_id=str(obj_id),
                public_id=_public_id(tracked, obj_id),
                action=event.pgh_label,
                changes=changes,
                actor_kind=metadata.get("actor_kind") or "",
                actor=metadata.get("actor") or "",
                reason=metadata.get("reason") or "",
                context={k: v for k, v in metadata.items() if k not in ("actor_kind", "actor", "reason", "user")},
                currency=str(now.get("currency") or ""),
            )
        )
    return entries


def _contexts(events: Iterable[Any]) -> dict[Any, dict[str, Any]]:
    context_ids = {e.pgh_context_id for e in events if e.pgh_context_id}
    return {c.id: dict(c.metadata) for c in Context.objects.filter(id__in=context_ids)}


def _trail(event_model: type[models.Model], *, limit: int | None = None, **lookup: Any) -> list[TrailEntry]:
    """The events of ``event_model`` that match ``lookup`` (the newest ``limit``), each diffed
    against its object's previous event (fetched too, whether it matches or not)."""
    manager = event_model._default_manager
    chosen = manager.filter(**lookup).order_by("-pgh_id")
    picked: list[Any] = list(chosen[:limit] if limit else chosen)
    if not picked:
        return []
    wanted = {e.pgh_id for e in picked}
    objects = {e.pgh_obj_id for e in picked}
    history = list(manager.filter(pgh_obj_id__in=objects, pgh_id__lte=max(wanted)).order_by("pgh_obj_id", "pgh_id"))
    entries = _entries(event_model, history, _contexts(picked))
    return [e for e in entries if int(e.event.rsplit(":", 1)[1]) in wanted]


def search(
    *,
    model: str = "",
    object_id: str = "",
    actor: str = "",
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 200,
) -> list[TrailEntry]:
    """The whole trail, newest first, narrowed by the tracked model's label
    (``invoicing.Invoice``), the object (its pk or public id, ``inv_…``), the actor (part of
    an email, ``usr_…``, a component or task name, case-insensitive) and a time range."""
    lookup: dict[str, Any] = {}
    if since:
        lookup["pgh_created_at__gte"] = since
    if until:
        lookup["pgh_created_at__lt"] = until
    if actor:
        lookup["pgh_context_id__in"] = Context.objects.filter(metadata__actor__icontains=actor).values("id")
    entries: list[TrailEntry] = []
    for event_model in event_models():
        tracked = event_model.pgh_tracked_model  # type: ignore[attr-defined]
        if model and tracked._meta.label_lower != model.lower():
            continue
        if object_id:
            pk = _pk_of(object_id)
            if pk is None:
                continue
            lookup["pgh_obj_id"] = pk
        entries.extend(_trail(event_model, limit=limit, **lookup))
    entries.sort(key=lambda e: (e.at, e.event), reverse=True)
    return entries[:limit]


def _pk_of(object_id: str) -> int | None:
    """A pk from what staff type: ``123`` or a public id (``acc_…``)."""
    object_id = object_id.strip()
    if object_id.isdigit():
        return int(object_id)
    prefix, _, rest = object_id.partition("_")
    if not rest:
        return None
    return ids.decode(prefix, object_id)


def object_trail(obj: models.Model) -> list[TrailEntry]:
    """Every change to ``obj``, newest first (its History)."""
    event_model = event_model_for(type(obj)._meta.concrete_model or type(obj))
    if event_model is None:
        return []
    return sorted(_trail(event_model, pgh_obj_id=obj.pk), key=lambda e: (e.at, e.event), reverse=True)


def account_trail(*, account_id: int, limit: int = 500) -> list[TrailEntry]:
    """Everything that happened to a billing account's records, newest first: the account
    itself and every tracked record that belongs to it (members, cards, invoices, credit
    notes, payments, refunds, disputes, dunning, grants, discounts, risk), ``limit`` at most.
    The customer page's timeline."""
    entries: list[TrailEntry] = []
    for event_model in event_models():
        account_field = getattr(event_model.pgh_tracked_model, "audit_account_field", None)  # type: ignore[attr-defined]
        if account_field is None:
            continue
        lookup = {"pgh_obj_id": account_id} if account_field == "id" else {account_field: account_id}
        entries.extend(_trail(event_model, limit=limit, **lookup))
    entries.sort(key=lambda e: (e.at, e.event), reverse=True)
    return entries[:limit]
