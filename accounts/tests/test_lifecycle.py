"""The billing account state machine: every allowed and forbidden transition, the audit
rows, reasons, operator-only moves and concurrent transitions."""

from __future__ import annotations

import threading

import pytest
from django.db import connection, connections, transaction

from accounts import services
from accounts.models import AccountState, BillingAccount, BillingAccountTransition
from accounts.tests.factories import BillingAccountFactory, UserFactory
from billing_site.common.actors import Actor, ActorKind
from billing_site.common.errors import ApplicationError

S = AccountState
# (transition, source) -> target; everything not listed is forbidden.
ALLOWED = {
    ("activate", S.PENDING): S.ACTIVE,
    ("suspend", S.ACTIVE): S.SUSPENDED,
    ("reactivate", S.SUSPENDED): S.ACTIVE,
    ("block", S.PENDING): S.BLOCKED,
    ("block", S.ACTIVE): S.BLOCKED,
    ("block", S.SUSPENDED): S.BLOCKED,
    ("unblock", S.BLOCKED): None,  # to active or pending, see below
    ("close", S.PENDING): S.CLOSED,
    ("close", S.ACTIVE): S.CLOSED,
    ("close", S.SUSPENDED): S.CLOSED,
}
ALL_PAIRS = [(t, s) for t in services.TRANSITIONS for s in S]
OPERATOR = Actor(kind=ActorKind.OPERATOR, name="ops@example.test")  # e.g. a management command


def _run(account: BillingAccount, transition: str, actor: Actor = OPERATOR, **kw: object) -> BillingAccount:
    return services.billing_account_transition(
        account_id=account.id, transition=transition, actor=actor, reason=kw.pop("reason", "because"), **kw
    )


@pytest.mark.django_db
@pytest.mark.parametrize(("transition", "source"), [p for p in ALL_PAIRS if p in ALLOWED and p[0] != "unblock"])
def test_allowed_transition_changes_state_and_writes_one_audit_row(transition: str, source: str) -> None:
    account = BillingAccountFactory(state=source)
    result = _run(account, transition, reason="ticket 42")
    target = ALLOWED[(transition, source)]
    account.refresh_from_db()
    assert result.state == account.state == target
    (row,) = BillingAccountTransition.objects.filter(account=account)
    assert (row.transition, row.from_state, row.to_state) == (transition, source, target)
    assert (row.actor_kind, row.actor_name, row.reason) == ("operator", "ops@example.test", "ticket 42")


@pytest.mark.django_db
@pytest.mark.parametrize("to_state", [S.ACTIVE, S.PENDING])
def test_operator_unblocks_to_active_or_pending(to_state: str) -> None:
    operator = UserFactory(is_staff=True)
    account = BillingAccountFactory(state=S.BLOCKED)
    _run(account, "unblock", Actor.operator(operator.id, operator.email), to_state=to_state)
    account.refresh_from_db()
    assert account.state == to_state
    row = BillingAccountTransition.objects.get(account=account)
    assert (row.from_state, row.to_state, row.actor_user_id) == (S.BLOCKED, to_state, operator.id)


@pytest.mark.django_db
@pytest.mark.parametrize(("transition", "source"), [p for p in ALL_PAIRS if p not in ALLOWED])
def test_forbidden_transition_is_a_conflict_and_changes_nothing(transition: str, source: str) -> None:
    account = BillingAccountFactory(state=source)
    with pytest.raises(ApplicationError) as err:
        _run(account, transition, to_state=S.ACTIVE)
    assert (err.value.status, err.value.code) == (409, "invalid_transition")
    account.refresh_from_db()
    assert account.state == source
    assert not BillingAccountTransition.objects.filter(account=account).exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("transition", "source"), [("suspend", S.ACTIVE), ("block", S.ACTIVE), ("close", S.ACTIVE), ("unblock", S.BLOCKED)]
)
def test_reason_is_required(transition: str, source: str) -> None:
    account = BillingAccountFactory(state=source)
    with pytest.raises(ApplicationError) as err:
        _run(account, transition, reason="   ", to_state=S.ACTIVE)
    assert err.value.code == "reason_required"
    assert err.value.errors[0]["field"] == "reason"
    account.refresh_from_db()
    assert account.state == source


@pytest.mark.django_db
@pytest.mark.parametrize("actor", [Actor.user(1, "a@example.test"), Actor.system("antifraud.rules")])
def test_only_an_operator_can_unblock(actor: Actor) -> None:
    account = BillingAccountFactory(state=S.BLOCKED)
    with pytest.raises(ApplicationError) as err:
        _run(account, "unblock", actor, to_state=S.ACTIVE)
    assert (err.value.status, err.value.code) == (403, "operator_only")


@pytest.mark.django_db
def test_system_actor_is_recorded_with_its_component() -> None:
    account = BillingAccountFactory(state=S.ACTIVE)
    _run(account, "suspend", Actor.system("payments.dunning"), reason="invoice overdue")
    row = BillingAccountTransition.objects.get(account=account)
    assert (row.actor_kind, row.actor_name, row.actor_user_id) == (ActorKind.SYSTEM, "payments.dunning", None)


@pytest.mark.django_db
def test_state_cannot_be_assigned_directly() -> None:
    account = BillingAccountFactory(state=S.ACTIVE)
    with pytest.raises(AttributeError):
        account.state = S.CLOSED


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("first", "second"), [("suspend", "suspend"), ("block", "close"), ("close", "close")])
def test_concurrent_transitions_one_wins_the_other_gets_a_clean_error(first: str, second: str) -> None:
    """Both transitions start while a third connection holds the row lock, so both are
    waiting at once; when it is released exactly one succeeds and one row is written."""
    account = BillingAccountFactory(state=S.ACTIVE)
    results: list[object] = []
    started = threading.Barrier(3)

    def attempt(name: str) -> None:
        try:
            started.wait()
            results.append(_run(account, name).state)
        except ApplicationError as exc:
            results.append(exc.code)
        except Exception as exc:  # surfaced by the assertion below
            results.append(repr(exc))
        finally:
            connections.close_all()

    with transaction.atomic():
        BillingAccount.objects.select_for_update().get(id=account.id)  # hold the lock
        threads = [threading.Thread(target=attempt, args=(name,)) for name in (first, second)]
        for thread in threads:
            thread.start()
        started.wait()
        waiting = _lock_waiters(2)
    for thread in threads:
        thread.join(timeout=30)

    assert waiting, f"the concurrent transitions never queued on the row lock: {results}"
    assert sorted(map(str, results)).count("invalid_transition") == 1, results
    assert BillingAccountTransition.objects.filter(account=account).count() == 1


def _lock_waiters(count: int) -> bool:
    """Wait until ``count`` other backends are waiting on a lock (so the race is real)."""
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_stat_clear_snapshot()")  # activity is snapshotted per transaction
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            if cursor.fetchone()[0] >= count:
                return True
        time.sleep(0.02)
    return False
