"""The audit trail: who changed what, when and why, for every record staff or the system may
change (accounts, cards, invoices, credit notes, payments, refunds, disputes, grants,
discounts, rules, thresholds, prices, tax rates, settings).

The record is written by PostgreSQL, not by Python: each tracked model (``@tracked``) has
django-pghistory triggers that copy the row into its event table (``<model>event``) on insert,
on an update that changes something, and on delete. Triggers see every write: the ORM's
``save()``, ``queryset.update()``, ``bulk_create`` and the set-based writers' raw SQL (the
period close, the charge run), which a ``post_save`` signal would miss.

Who and why ride along as the *context* (``pghistory_context``: one row per context, its
``metadata`` a JSON object every event of the context points to), set by ``audit_context``:

- a web request: ``billing_site.common.audit.AuditContextMiddleware`` (the staff user, the
  customer or the API key, the URL);
- a Celery task: ``billing_site.audit.tasks`` (``task:<name>`` and the task id);
- a management command: ``manage.py`` (``command:<name>``);
- a service that takes an ``actor`` and a ``reason`` (transitions, refunds, write-offs, grants,
  staff edits): ``with audit_context(actor=actor, reason=reason):`` around its writes.

The metadata's keys (one vocabulary, read by the trail's pages and selectors):

``actor_kind``  ``operator`` | ``user`` | ``system`` (``billing_site.common.actors``)
``actor``       an operator's email, a customer's ``usr_…`` id, a component's name
``user``        the ``accounts.User`` id of an operator or a customer
``api_key``     the ``key_…`` id of the API key a request came with
``reason``      why, as the person (or the component) said it
``url``, ``method``, ``task``, ``task_id``, ``command``: where the change came from

Personal data: the trail keeps a staff member's email (the trail must name who did it even
after their login is gone), but a customer only by id (``usr_…``): the trail is append-only and
outlives a customer's right to erasure; their current email is looked up when shown. Logs
keep neither (``transitions.actor_log_fields``).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import pghistory
import pgtrigger
from django.db import connection, models
from pghistory import runtime as _runtime

from billing_site.common import ids
from billing_site.common.actors import Actor, ActorKind

REASON_MAX = 1000

M = TypeVar("M", bound=type[models.Model])


def tracked(*, account: str | None, exclude: tuple[str, ...] = ()) -> Callable[[M], M]:
    """Track the model in the audit trail: an event row on insert, on an update that changes
    a tracked field (``updated_at``-only and no-op updates are skipped) and on delete.

    ``account``: the field that says which billing account a row belongs to (``"id"`` for the
    account itself, ``"account_id"`` for its invoices, cards …), so that the account's trail
    (``billing_site.audit.selectors.account_trail``) finds it; ``None`` for shared records
    (tax rates, rules, prices). ``exclude``: fields not worth a history (secrets, counters that
    move on every use).

    The triggers are statement-level: a set-based writer's ``UPDATE … FROM unnest(…)`` of
    500 invoices fires one trigger that inserts 500 events from the statement's transition
    tables, not 500 trigger calls."""

    def decorate(model: M) -> M:
        model.audit_account_field = account  # type: ignore[attr-defined]
        meta: dict[str, Any] = {}
        if account is not None and account != "id":  # the account's own events: by pgh_obj (indexed)
            name = f"{model._meta.db_table[:22]}_ev_acct"
            meta["indexes"] = [models.Index(fields=[account, "pgh_id"], name=name)]
        return pghistory.track(
            pghistory.InsertEvent(),
            pghistory.UpdateEvent(condition=pghistory.AnyChange(exclude_auto=True)),
            pghistory.DeleteEvent(),
            exclude=list(exclude) or None,
            level=pgtrigger.Statement,
            meta=meta or None,
        )(model)

    return decorate


def actor_metadata(actor: Actor) -> dict[str, Any]:
    """What the trail keeps of an actor (see the module's docstring on personal data)."""
    if actor.kind == ActorKind.OPERATOR:
        return {"actor_kind": actor.kind.value, "actor": actor.name, "user": actor.user_id}
    if actor.kind == ActorKind.USER:
        name = ids.encode("usr", actor.user_id) if actor.user_id is not None else "customer"
        return {"actor_kind": actor.kind.value, "actor": name, "user": actor.user_id}
    return {"actor_kind": actor.kind.value, "actor": actor.name, "user": None}


def _current() -> Any:
    return getattr(_runtime._tracker, "value", None)


@contextmanager
def audit_context(*, actor: Actor | None = None, reason: str = "", **extra: Any) -> Iterator[None]:
    """Attach who (``actor``) and why (``reason``) and where (``extra``: ``url``, ``task`` …) to
    every tracked change written inside the block.

    Outermost, it opens a pghistory context. Inside another one, the same metadata adds
    nothing; a different actor or reason opens a context of its own (with the outer one's
    metadata as the base, e.g. the URL), restored on the way out: a context's metadata is one
    row shared by all its events, so changing it in place would relabel what the outer block
    already wrote (a staff request that suspends one account and edits another)."""
    metadata: dict[str, Any] = {}
    if actor is not None:
        metadata.update(actor_metadata(actor))
    reason = reason.strip()[:REASON_MAX]
    if reason:
        metadata["reason"] = reason
    metadata.update({key: value for key, value in extra.items() if value is not None})
    outer = _current()
    if outer is None:
        # Ours first, so it runs before pghistory's own wrapper (the first installed is the
        # outermost): see ``_literal_percents``.
        with connection.execute_wrapper(_literal_percents), pghistory.context(**metadata):
            yield
        return
    if all(outer.metadata.get(key) == value for key, value in metadata.items()):
        yield
        return
    _runtime._tracker.value = _runtime.Context(id=uuid.uuid4(), metadata={**outer.metadata, **metadata})
    try:
        yield
    finally:
        _runtime._tracker.value = outer


def _literal_percents(
    execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Mapping[str, Any]
) -> Any:
    """pghistory prepends its ``set_config(…, %s)`` to each statement and passes the context as
    parameters; a statement sent with no parameters (a migration's DDL, ``format('%I', …)`` in
    a DO block, ``LIKE 'x%'``) then has its literal ``%`` read as placeholders by the driver and
    fails ("the query has 3 placeholders but 2 parameters were passed"). Escape them, exactly
    when pghistory will add parameters (its own test, ``_can_inject_variable``: django-pghistory
    is pinned; a new version must keep that function, ``tests/test_audit_trail.py`` notices)."""
    literal = params is None and not many and isinstance(sql, str) and "%" in sql
    if literal and _runtime._can_inject_variable(context["cursor"], sql):
        sql = sql.replace("%", "%%")
    return execute(sql, params, many, context)


P = ParamSpec("P")
R = TypeVar("R")


def audited(func: Callable[P, R]) -> Callable[P, R]:
    """For a service that takes an ``actor`` keyword and says why with ``reason`` (or, where
    the why is a note or a message to the customer, ``note`` / ``message``): its writes carry
    them in the trail (``audit_context``). Above ``@transaction.atomic``, or below: the context
    is attached to each statement either way."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        actor = kwargs.get("actor")
        reason = next((v for k in ("reason", "note", "message") if isinstance(v := kwargs.get(k), str)), "")
        with audit_context(actor=actor if isinstance(actor, Actor) else None, reason=reason):
            return func(*args, **kwargs)

    return wrapper


def audit_note(**metadata: Any) -> None:
    """Add to the current context's metadata in place (nothing outside one): for what is
    learnt before anything is written, such as the user DRF authenticates inside the view."""
    current = _current()
    if current is not None:
        current.metadata.update({key: value for key, value in metadata.items() if value is not None})


# --- Web requests


def _user_metadata(user: Any) -> dict[str, Any]:
    if user is None or not getattr(user, "is_authenticated", False) or not hasattr(user, "_meta"):
        return {}
    if getattr(user, "is_staff", False):
        return actor_metadata(Actor.operator(user.pk, user.get_username()))
    return actor_metadata(Actor.user(user.pk, ""))


def _key_metadata(auth: Any) -> dict[str, Any]:
    public_id = getattr(auth, "public_id", None)
    if not isinstance(public_id, str):
        return {}
    if getattr(auth, "user_id", None) is None:  # a service key: a producer of ours
        return {"api_key": public_id, "actor_kind": ActorKind.SYSTEM.value, "actor": f"api_key:{public_id}"}
    return {"api_key": public_id}


class _AuditedRequest:
    """A request that notes its user (and API key) in the audit context when they are set:
    DRF authenticates in the view, after the middleware ran (as pghistory's own middleware
    does)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "user":
            audit_note(**_user_metadata(value))
        elif name == "auth":
            audit_note(**_key_metadata(value))
        super().__setattr__(name, value)


_audited_classes: dict[type, type] = {}


def _audited_class(cls: type) -> type:
    if cls not in _audited_classes:
        _audited_classes[cls] = type(f"Audited{cls.__name__}", (_AuditedRequest, cls), {})
    return _audited_classes[cls]


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AuditContextMiddleware:
    """Every request's changes carry who made them (the staff user or the customer, once
    authenticated) and the URL. After ``AuthenticationMiddleware`` (it reads ``request.user``)."""

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        if request.method in SAFE_METHODS:
            # A read writes no tracked record: no context, so none of its statements carries
            # pghistory's set_config prefix (the costs API, every admin page view).
            return self.get_response(request)
        user = getattr(request, "user", None)
        with audit_context(url=request.path, method=request.method):
            audit_note(**_user_metadata(user))
            request.__class__ = _audited_class(type(request))
            return self.get_response(request)


def context_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A context's metadata with every key of the vocabulary present (``None`` if unknown)."""
    keys = ("actor_kind", "actor", "user", "api_key", "reason", "url", "method", "task", "task_id", "command")
    metadata = metadata or {}
    return {key: metadata.get(key) for key in keys}
