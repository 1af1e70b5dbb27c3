"""Who did it: every state change and audit row names an actor."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ActorKind(StrEnum):
    USER = "user"  # a customer, through the API
    OPERATOR = "operator"  # staff, through the admin or a management command
    SYSTEM = "system"  # a component of ours (payments.dunning, antifraud.rules …)


@dataclass(frozen=True, slots=True)
class Actor:
    kind: ActorKind
    name: str
    user_id: int | None = None

    @classmethod
    def user(cls, user_id: int, email: str) -> Actor:
        return cls(kind=ActorKind.USER, name=email, user_id=user_id)

    @classmethod
    def operator(cls, user_id: int, email: str) -> Actor:
        return cls(kind=ActorKind.OPERATOR, name=email, user_id=user_id)

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(kind=ActorKind.SYSTEM, name=component)
