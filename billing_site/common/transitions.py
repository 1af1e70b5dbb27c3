"""One way to move any state machine of ours: under the row lock, the state re-checked, the
audit row written in the same transaction, one log line.

Every stateful model (accounts, invoices, payments, refunds, disputes, dunning cases …) is a
django-fsm model with ``protected=True`` and says how its audit row looks, by implementing
``audit_record`` (``AuditedTransitions`` writes it for an audit table that is a
``StateChangeRecord`` reached as ``transitions``)::

    class Refund(AuditedTransitions, FSMModelMixin, models.Model):
        TRANSITION_LOG = "refund.transition"       # the log event
        status = FSMField(..., protected=True)

        def log_fields(self) -> dict[str, object]:   # ids for the log line (no personal data)
            return {"refund_id": self.public_id}

A service then calls ``transition_locked(Refund, refund_id, "succeed", actor=..., reason=...)``
(locks the row itself) or ``transition(refund, "succeed", ...)`` on a row it already locked with
``select_for_update()``. A transition that is not allowed from the state found under the lock
(say, the loser of two concurrent ones) is a 409 ``invalid_transition``; nothing is written.
Side effects (tasks, emails, ledger postings) stay with the service, around the transition.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar, cast

from django.db import connection, models
from django.utils import timezone
from django_fsm import can_proceed

from billing_site.common.actors import Actor, ActorKind
from billing_site.common.audit import audit_context
from billing_site.common.copy import BulkTable
from billing_site.common.errors import Conflict, NotFound

log = logging.getLogger(__name__)

REASON_MAX = 1000


class StateMachine(Protocol):
    """What a model offers to be moved by ``transition``."""

    TRANSITION_LOG: str

    def audit_record(
        self, *, transition: str, from_state: str, actor: Actor, reason: str, to_state: str | None = None
    ) -> models.Model: ...

    def log_fields(self) -> dict[str, object]: ...

    def save(self, *args: Any, **kwargs: Any) -> None: ...


M = TypeVar("M", bound=models.Model)


class StateChangeRecord(models.Model):
    """The audit row of one transition: the columns every state machine's audit table shares
    (each adds the foreign key to its subject, named by ``related_name="transitions"``, and its
    states with their choices)."""

    account_id = models.BigIntegerField()
    actor_kind = models.CharField(max_length=16)
    actor_name = models.CharField(max_length=254)
    reason = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        abstract = True


class StateChangeRow(NamedTuple):
    """A ``StateChangeRecord`` row as a set-based writer COPYs it (``state_change_table``):
    ``subject_id`` is the id of the row that moved (the payment, the invoice …)."""

    subject_id: int
    account_id: int
    from_state: str
    to_state: str
    actor_kind: str
    actor_name: str
    reason: str
    created_at: dt.datetime


def state_change_table(record: type[StateChangeRecord]) -> BulkTable:
    """The audit table ``record`` (a ``StateChangeRecord``) as a ``BulkTable`` of
    ``StateChangeRow``: its table, and its subject's column for ``subject_id``."""
    subject = next(
        field
        for field in record._meta.concrete_fields
        if field.is_relation and getattr(field.remote_field, "related_name", None) == "transitions"
    )
    return BulkTable(
        record._meta.db_table,
        StateChangeRow,
        {
            "subject_id": "bigint",
            "account_id": "bigint",
            "from_state": "text",
            "to_state": "text",
            "actor_kind": "text",
            "actor_name": "text",
            "reason": "text",
            "created_at": "timestamptz",
        },
        columns={"subject_id": subject.column},
    )


class AuditedTransitions:
    """A state machine whose audit table is a ``StateChangeRecord`` reached by the reverse
    relation ``transitions``: its ``audit_record`` comes from here (an account's, which also
    keeps the transition's name, cause and user, is its own)."""

    account_id: int

    def audit_record(
        self, *, transition: str, from_state: str, actor: Actor, reason: str, to_state: str | None = None
    ) -> models.Model:
        relation = cast(models.Model, self)._meta.get_field("transitions")
        record_model = cast(type[models.Model], relation.related_model)
        subject = cast(Any, relation).field.name
        return record_model(
            **{subject: self},
            account_id=self.account_id,
            from_state=from_state,
            to_state=to_state or getattr(self, state_field_name(cast(models.Model, self))),
            actor_kind=actor.kind.value,
            actor_name=actor.name[:254],
            reason=reason,
        )


def state_field_name(obj: models.Model) -> str:
    """The name of the model's one FSM field."""
    from django_fsm import FSMFieldMixin

    for field in obj._meta.concrete_fields:
        if isinstance(field, FSMFieldMixin):
            return str(field.name)
    raise TypeError(f"{type(obj).__name__} has no FSM field")


def actor_log_fields(actor: Actor) -> dict[str, object]:
    """Who, for a log line: a component by name; a person by kind and id, never by email."""
    if actor.kind == ActorKind.SYSTEM:
        return {"actor_kind": actor.kind.value, "actor": actor.name}
    return {"actor_kind": actor.kind.value, "actor_user_id": actor.user_id}


def transition(
    obj: M,
    name: str,
    *,
    actor: Actor,
    reason: str = "",
    args: Sequence[object] = (),
    update_fields: Iterable[str] | None = (),
) -> str:
    """Apply the FSM transition ``name`` to ``obj`` (locked by the caller, inside its
    transaction), save the state (and ``update_fields``; ``None``: every field, for a caller
    that set several with the transition, e.g. a gateway's answer), write the audit row and
    log one line. Returns the state it came from."""
    if not connection.in_atomic_block:
        raise RuntimeError("a transition runs inside the transaction that locked its row")
    machine = cast(StateMachine, obj)
    state_field = state_field_name(obj)
    before = str(getattr(obj, state_field))
    method = getattr(obj, name)
    if not can_proceed(method):
        label = obj._meta.verbose_name
        raise Conflict("invalid_transition", f"Cannot {name.replace('_', ' ')} a {label} that is {before}.")
    method(*args)
    reason = reason.strip()[:REASON_MAX]
    with audit_context(actor=actor, reason=reason):  # the trail's event of this save: who and why
        if update_fields is None:
            obj.save()
        else:
            fields = [state_field, *update_fields]
            if any(f.name == "updated_at" for f in obj._meta.concrete_fields):
                fields.append("updated_at")
            obj.save(update_fields=sorted(set(fields)))
    machine.audit_record(transition=name, from_state=before, actor=actor, reason=reason).save()
    log.info(
        machine.TRANSITION_LOG,
        extra={
            **machine.log_fields(),
            "transition": name,
            "from": before,
            "to": str(getattr(obj, state_field)),
            **actor_log_fields(actor),
        },
    )
    return before


def locked(model: type[M], pk: object, *, message: str | None = None) -> M:
    """``model``'s row ``pk`` under ``SELECT … FOR UPDATE``; 404 when there is none."""
    obj = model._default_manager.select_for_update().filter(pk=pk).first()
    if obj is None:
        raise NotFound(message or f"No such {model._meta.verbose_name}.")
    return obj


def transition_locked(
    model: type[M],
    pk: object,
    name: str,
    *,
    actor: Actor,
    reason: str = "",
    args: Sequence[object] = (),
    update_fields: Iterable[str] | None = (),
) -> M:
    """Lock ``model``'s row ``pk`` and ``transition`` it; the row, in its new state."""
    obj = locked(model, pk)
    transition(obj, name, actor=actor, reason=reason, args=args, update_fields=update_fields)
    return obj


def record_many(
    objs: Sequence[models.Model],
    name: str,
    *,
    from_state: str,
    to_state: str,
    actor: Actor,
    reasons: Sequence[str] | str = "",
) -> None:
    """For a set-based writer that moved many rows from ``from_state`` to ``to_state`` in one
    statement (the invoices a charged chunk paid): the same audit rows as ``transition``
    (``reasons``: one for all, or one per row), by one COPY, and one log line for the chunk,
    ``<TRANSITION_LOG>s``, carrying each row's ids as lists in one order (``invoice_ids``,
    ``account_ids`` …: each of ``log_fields`` pluralised) instead of a line per row."""
    if not objs:
        return
    if not connection.in_atomic_block:
        raise RuntimeError("a transition's audit rows are written in the transaction that moved the rows")
    each = [reasons] * len(objs) if isinstance(reasons, str) else list(reasons)
    machines = [cast(StateMachine, obj) for obj in objs]
    record_model = cast(type[StateChangeRecord], objs[0]._meta.get_field("transitions").related_model)
    now = timezone.now()
    state_change_table(record_model).copy(
        StateChangeRow(
            cast(int, obj.pk),
            cast(Any, obj).account_id,
            from_state,
            to_state,
            actor.kind.value,
            actor.name[:254],
            r.strip()[:REASON_MAX],
            now,
        )
        for obj, r in zip(objs, each, strict=True)
    )
    fields = [m.log_fields() for m in machines]
    log.info(
        f"{machines[0].TRANSITION_LOG}s",
        extra={
            "count": len(machines),
            **{f"{key}s": [f[key] for f in fields] for key in fields[0]},
            "transition": name,
            "from": from_state,
            "to": to_state,
            **actor_log_fields(actor),
        },
    )
