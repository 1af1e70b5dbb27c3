"""Writes of the payments app around cards: the account's payment profile and its customer at
the gateway, card binding (SetupIntents), payment methods. Charging is in ``charging``,
refunds and disputes in ``refunds``, webhooks in ``webhooks``, dunning in ``dunning``.

Gateway calls happen outside transactions: first the call, then a short durable transaction
that records what came back (or, for charges and refunds, the intent first, see ``charging``).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from accounts import selectors as account_selectors
from accounts import services as account_services
from antifraud import services as antifraud_services
from billing_site.common import ids
from billing_site.common.actors import Actor
from billing_site.common.audit import audited
from billing_site.common.errors import ApplicationError, Conflict, NotFound
from billing_site.common.transactions import forbid_transaction
from billing_site.common.transitions import actor_log_fields
from billing_site.outbox import services as outbox
from invoicing import selectors as invoicing_selectors
from payments import approvals, charging, refunds
from payments.gateways import gateway as gateway_named
from payments.gateways.base import Gateway, GatewayError, PaymentDeclined, SetupStatus
from payments.models import (
    BindingAttempt,
    BindingStatus,
    DunningPolicy,
    GatewayName,
    PaymentMethod,
    PaymentProfile,
    PaymentTrigger,
)

log = logging.getLogger(__name__)

SYSTEM = Actor.system("payments")

# Four-eyes: refunds within the threshold at once, above it a request (``refunds.refund_submit``);
# approving carries any kind out once (``approvals``).
refund_submit = refunds.refund_submit
approval_approve = approvals.approval_approve
approval_reject = approvals.approval_reject
approval_execute = approvals.approval_execute


def _gateway_error(exc: GatewayError) -> ApplicationError:
    """A gateway failure on a customer's request, as an API error (never the gateway's text)."""
    return ApplicationError("gateway_unavailable", "The payment gateway is not reachable; try again.", status=503)


# --- The account's profile and customer


def profile_ensure(*, account_id: int) -> PaymentProfile:
    """The account's payment profile, created with the default gateway on first use (an
    INSERT … ON CONFLICT: two first uses at once create one)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO payments_paymentprofile (account_id, gateway, gateway_customer_id, dunning_paused, "
            "dunning_paused_reason, created_at, updated_at) VALUES (%s, %s, '', false, '', now(), now()) "
            "ON CONFLICT (account_id) DO NOTHING",
            [account_id, settings.PAYMENTS_DEFAULT_GATEWAY],
        )
    return PaymentProfile.objects.get(account_id=account_id)


def customer_ensure(*, account_id: int) -> tuple[PaymentProfile, Gateway]:
    """The account's customer at its gateway, created there on first use (outside any
    transaction), then recorded with a conditional UPDATE: if two requests created one each,
    the first recorded wins and the other stays unused at the gateway."""
    forbid_transaction("Creating a gateway customer")
    profile = profile_ensure(account_id=account_id)
    gateway = gateway_named(profile.gateway)
    if profile.gateway_customer_id:
        return profile, gateway
    account = account_selectors.billing_profiles(account_ids=[account_id]).get(account_id)
    if account is None:
        raise NotFound("No such billing account.")
    try:
        customer_id = gateway.customer_create(
            account_ref=account.public_id,
            email=account.email,
            name=account.name,
            idempotency_key=f"customer-{account.public_id}",
        )
    except GatewayError as exc:
        raise _gateway_error(exc) from exc
    PaymentProfile.objects.filter(account_id=account_id, gateway_customer_id="").update(
        gateway_customer_id=customer_id, updated_at=timezone.now()
    )
    profile.refresh_from_db()
    log.info(
        "payments.customer",
        extra={"account_id": account.public_id, "gateway": profile.gateway, "customer": profile.gateway_customer_id},
    )
    return profile, gateway


# --- Card binding


@dataclass(frozen=True, slots=True)
class BindingStart:
    gateway: str
    setup_intent_id: str
    client_secret: str
    publishable_key: str


def _bindable(account_id: int) -> None:
    standing = account_selectors.billing_account_standings({account_id}).get(account_id)
    if standing is None:
        raise NotFound("No such billing account.")
    if standing.state in ("closed", "blocked"):
        raise Conflict("account_not_bindable", f"Cards cannot be bound to a {standing.state} billing account.")


def binding_start(*, account_id: int, user_id: int | None, client_ip: str | None) -> BindingStart:
    """A SetupIntent for the browser to confirm the card with (card data never reach us)."""
    _bindable(account_id)
    profile, gateway = customer_ensure(account_id=account_id)
    try:
        intent = gateway.setup_intent_create(
            customer_id=profile.gateway_customer_id,
            metadata={"account_id": ids.encode("acc", account_id)},
            idempotency_key=f"setup-{secrets.token_hex(12)}",
        )
    except GatewayError as exc:
        raise _gateway_error(exc) from exc
    BindingAttempt.objects.create(
        account_id=account_id,
        gateway=profile.gateway,
        setup_intent_id=intent.id,
        user_id=user_id,
        client_ip=client_ip,
    )
    log.info(
        "payments.binding_started",
        extra={"account_id": ids.encode("acc", account_id), "gateway": profile.gateway, "setup_intent": intent.id},
    )
    return BindingStart(
        gateway=profile.gateway,
        setup_intent_id=intent.id,
        client_secret=intent.client_secret,
        publishable_key=gateway.publishable_key,
    )


def binding_complete(
    *, account_id: int | None, setup_intent_id: str, gateway_name: str, test_payment_method: str = ""
) -> PaymentMethod:
    """Complete a binding the browser confirmed (the API, ``account_id`` given and checked)
    or the ``setup_intent.succeeded`` webhook (``account_id`` None: found from the intent).

    The server asks the gateway: the SetupIntent must have succeeded and belong to the
    account's customer. Both paths converge on one PaymentMethod row (unique per gateway
    payment method id). The account's first card becomes its default; a new default card
    retries what is outstanding at once; the first successful binding asks antifraud's
    decision point whether the account may be activated."""
    forbid_transaction("Completing a card binding")
    attempt = BindingAttempt.objects.filter(gateway=gateway_name, setup_intent_id=setup_intent_id).first()
    if attempt is None or (account_id is not None and attempt.account_id != account_id):
        raise NotFound("No such card binding for this billing account.")
    account_id = attempt.account_id
    profile = PaymentProfile.objects.get(account_id=account_id)
    gateway = gateway_named(gateway_name)
    try:
        if test_payment_method:
            if not gateway.test_mode:
                raise ApplicationError(
                    "test_mode_only", "test_payment_method is accepted in test mode only.", field="test_payment_method"
                )
            intent = gateway.setup_intent_confirm_test(
                intent_id=setup_intent_id, test_payment_method=test_payment_method
            )
        else:
            intent = gateway.setup_intent_retrieve(setup_intent_id)
    except PaymentDeclined as exc:
        BindingAttempt.objects.filter(id=attempt.id).update(
            status=BindingStatus.FAILED, failure_code=exc.code[:64], updated_at=timezone.now()
        )
        # Card testing is counted (and assessed) by antifraud.
        antifraud_services.binding_failure_record(
            account_id=account_id, user_id=attempt.user_id, ip=attempt.client_ip, code=exc.code
        )
        log.info(
            "payments.binding_declined",
            extra={"account_id": ids.encode("acc", account_id), "setup_intent": setup_intent_id, "code": exc.code},
        )
        raise ApplicationError(
            "card_declined", "The card was declined.", status=402, field="test_payment_method"
        ) from exc
    except GatewayError as exc:
        if getattr(exc, "code", "") in ("payment_method_unknown", "resource_missing"):
            raise ApplicationError("invalid", str(exc), field="test_payment_method") from exc
        raise _gateway_error(exc) from exc
    if intent.customer_id != profile.gateway_customer_id:
        raise NotFound("No such card binding for this billing account.")
    if intent.status != SetupStatus.SUCCEEDED or not intent.payment_method_id:
        raise Conflict("setup_incomplete", f"The card binding has not succeeded (it is {intent.status}).")
    try:
        info = gateway.payment_method_retrieve(intent.payment_method_id)
    except GatewayError as exc:
        raise _gateway_error(exc) from exc
    return _binding_record(attempt=attempt, gateway_name=gateway_name, info=info, setup_intent_id=setup_intent_id)


@transaction.atomic(durable=True)
def _binding_record(*, attempt: BindingAttempt, gateway_name: str, info: object, setup_intent_id: str) -> PaymentMethod:
    from payments.gateways.base import PaymentMethodInfo

    assert isinstance(info, PaymentMethodInfo)
    account_id = attempt.account_id
    card = info.card
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO payments_paymentmethod (id, account_id, gateway, gateway_payment_method_id, setup_intent_id,
                brand, last4, exp_month, exp_year, fingerprint, issuer_country, funding, is_default, created_at)
            VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, false, now())
            ON CONFLICT (gateway, gateway_payment_method_id) DO NOTHING
            RETURNING id
            """,
            [
                ids.new_id(),
                account_id,
                gateway_name,
                info.id,
                setup_intent_id,
                card.brand,
                card.last4[-4:],
                card.exp_month,
                card.exp_year,
                card.fingerprint,
                card.country[:2],
                card.funding[:16],
            ],
        )
        created = cursor.fetchone() is not None
    method = PaymentMethod.objects.select_for_update().get(gateway=gateway_name, gateway_payment_method_id=info.id)
    if method.account_id != account_id:  # pragma: no cover - the gateway's ids are per customer
        raise Conflict("conflict", "This card is bound to another billing account.")
    first_binding = not BindingAttempt.objects.filter(account_id=account_id, status=BindingStatus.SUCCEEDED).exists()
    BindingAttempt.objects.filter(id=attempt.id).update(
        status=BindingStatus.SUCCEEDED, payment_method=method, updated_at=timezone.now()
    )
    if created and charging.default_payment_method(account_id) is None:
        _make_default(method)
    if created:
        log.info(
            "payments.card_bound",
            extra={
                "account_id": ids.encode("acc", account_id),
                "payment_method_id": method.public_id,
                "gateway": gateway_name,
                "brand": method.brand,
                "default": method.is_default,
            },
        )
    decision = binding_decision(attempt=attempt, payment_method=method) if created or first_binding else ""
    if first_binding and decision == "allow":
        outbox.enqueue_task(
            "payments.account_activate",
            account_id=account_id,
            reason="first card bound",
            dedupe_key=f"activate-on-binding:{account_id}",
        )
    return method


def binding_decision(*, attempt: BindingAttempt, payment_method: PaymentMethod) -> str:
    """Whether a bound card activates a pending account: the single decision point, antifraud's
    card-binding checkpoint (in the binding's transaction; a block it decides reaches the
    account through the outbox). ``allow``, ``review`` (stays pending) or ``block``."""
    outcome = antifraud_services.card_binding_assess(
        account_id=attempt.account_id,
        user_id=attempt.user_id,
        ip=attempt.client_ip,
        card=antifraud_services.Card(
            fingerprint=payment_method.fingerprint,
            brand=payment_method.brand,
            last4=payment_method.last4,
            country=payment_method.issuer_country,
            funding=payment_method.funding,
        ),
    )
    return outcome.decision


def _make_default(method: PaymentMethod) -> None:
    # The profile row lock orders this against a payment's outcome (``charging._charge_new_default``):
    # one of the two sees the other, so the new default is charged whatever the interleaving.
    PaymentProfile.objects.select_for_update().filter(account_id=method.account_id).first()
    PaymentMethod.objects.filter(account_id=method.account_id, is_default=True).exclude(id=method.id).update(
        is_default=False
    )
    method.is_default = True
    method.save(update_fields=["is_default"])
    # A new default card pays what is outstanding at once (dunning's "new card" retry).
    charging.account_charge_outstanding(account_id=method.account_id, trigger=PaymentTrigger.NEW_CARD)


@transaction.atomic(durable=True)
def payment_method_set_default(*, account_id: int, payment_method_id: int) -> PaymentMethod:
    method = (
        PaymentMethod.objects.select_for_update()
        .filter(account_id=account_id, id=payment_method_id, detached_at__isnull=True)
        .first()
    )
    if method is None:
        raise NotFound("No such payment method.")
    if not method.is_default:
        _make_default(method)
        log.info(
            "payments.default_card",
            extra={"account_id": ids.encode("acc", account_id), "payment_method_id": method.public_id},
        )
    return method


def payment_method_remove(*, account_id: int, payment_method_id: int) -> None:
    """Detach a card at the gateway, then mark it removed. The default card cannot be removed
    while invoices are unpaid, unless another card was made the default first (409)."""
    forbid_transaction("Removing a card")
    method = PaymentMethod.objects.filter(account_id=account_id, id=payment_method_id, detached_at__isnull=True).first()
    if method is None:
        raise NotFound("No such payment method.")
    if method.is_default and invoicing_selectors.payable_invoices(account_id=account_id):
        raise Conflict(
            "default_card_required",
            "Invoices are unpaid: make another card the default before removing this one.",
        )
    try:
        gateway_named(method.gateway).payment_method_detach(method.gateway_payment_method_id)
    except GatewayError as exc:
        if getattr(exc, "code", "") not in ("resource_missing", "payment_method_not_attached"):
            raise _gateway_error(exc) from exc
    payment_method_detached(gateway_name=method.gateway, gateway_payment_method_id=method.gateway_payment_method_id)


@transaction.atomic(durable=True)
def payment_method_detached(*, gateway_name: str, gateway_payment_method_id: str) -> PaymentMethod | None:
    """Record that a card is detached (our removal, or the ``payment_method.detached`` webhook)."""
    method = (
        PaymentMethod.objects.select_for_update()
        .filter(gateway=gateway_name, gateway_payment_method_id=gateway_payment_method_id)
        .first()
    )
    if method is None or method.detached_at is not None:
        return method
    method.detached_at = timezone.now()
    method.is_default = False
    method.save(update_fields=["detached_at", "is_default"])
    log.info(
        "payments.card_removed",
        extra={"account_id": ids.encode("acc", method.account_id), "payment_method_id": method.public_id},
    )
    return method


# --- Account transitions triggered by payments (run by outbox tasks)


def account_activate(*, account_id: int, reason: str) -> bool:
    """Activate a pending account (the first card bound and allowed). Idempotent: any other
    state is left alone."""
    try:
        account_services.billing_account_transition(
            account_id=account_id, transition="activate", actor=SYSTEM, reason=reason
        )
    except (Conflict, NotFound):
        return False
    return True


def account_suspend(*, account_id: int, reason: str) -> bool:
    try:
        account_services.billing_account_transition(
            account_id=account_id, transition="suspend", actor=SYSTEM, reason=reason
        )
    except (Conflict, NotFound):
        return False
    return True


def account_reactivate(*, account_id: int, reason: str) -> bool:
    """Reactivate a suspended account whose debt is settled (re-checked here: a case opened
    meanwhile keeps it suspended)."""
    from payments.dunning import SUSPENDING_STATUSES
    from payments.models import DunningCase

    if DunningCase.objects.filter(
        account_id=account_id, status__in=SUSPENDING_STATUSES, suspended_account=True
    ).exists():
        return False
    try:
        account_services.billing_account_transition(
            account_id=account_id, transition="reactivate", actor=SYSTEM, reason=reason
        )
    except (Conflict, NotFound):
        return False
    return True


def gateway_names() -> list[str]:
    return list(GatewayName.values)


@audited
@transaction.atomic(durable=True)
def dunning_pause(*, account_id: int, paused: bool, reason: str, actor: Actor) -> PaymentProfile:
    """Operators pause (or resume) dunning for an account."""
    reason = reason.strip()
    if paused and not reason:
        raise ApplicationError("reason_required", "A reason is required to pause dunning.", field="reason")
    profile_ensure(account_id=account_id)
    profile = PaymentProfile.objects.select_for_update().get(account_id=account_id)
    profile.dunning_paused = paused
    profile.dunning_paused_reason = reason if paused else ""
    profile.save(update_fields=["dunning_paused", "dunning_paused_reason", "updated_at"])
    log.info(
        "dunning.paused" if paused else "dunning.resumed",
        extra={"account_id": ids.encode("acc", account_id), **actor_log_fields(actor)},
    )
    return profile


@audited
@transaction.atomic  # not durable: the admin's change form saves inside its own transaction
def dunning_policy_save(*, policy: DunningPolicy, changed: list[str], actor: Actor) -> DunningPolicy:
    """Create or change a dunning policy, refused with a 400 ``invalid_policy`` naming the
    field when its ladder is wrong (``DunningPolicy.ladder_errors``: retries increasing and
    before the suspension, the warning before it, the write-off after it)."""
    errors = policy.ladder_errors()
    if errors:
        field, message = next(iter(errors.items()))
        raise ApplicationError("invalid_policy", message, field=field)
    created = policy.pk is None
    policy.save()
    log.info(
        "dunning_policy.created" if created else "dunning_policy.changed",
        extra={
            "policy_id": policy.pk,
            "currency": policy.currency or None,
            "account_kind": policy.account_kind or None,
            "retry_days": list(policy.retry_days),
            "suspend_after_days": policy.suspend_after_days,
            "write_off_after_days": policy.write_off_after_days,
            "fields": sorted(changed),
            **actor_log_fields(actor),
        },
    )
    return policy


def charge_invoice_task_body(*, invoice_id: int, trigger: str) -> str:
    """What ``payments.charge_invoice`` does: charge, and say how it ended (for its log)."""
    try:
        payment = charging.invoice_charge(invoice_id=invoice_id, trigger=trigger)
    except (Conflict, NotFound) as exc:
        return exc.code
    return payment.status
