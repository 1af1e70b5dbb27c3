from __future__ import annotations

from typing import Any, ClassVar

from django.conf import settings
from django.contrib.auth import password_validation
from django_countries.data import COUNTRIES
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from accounts import validation
from accounts.models import AccountKind, AccountState, BillingAccount, MemberRole
from billing_site.common import money
from billing_site.common.serializers import CodeField, StrictSerializer

# Every ISO 3166-1 alpha-2 code, with its English name for the schema's enum description.
COUNTRY_CHOICES = sorted(COUNTRIES.items())


def _password_min_length() -> int:
    lengths = [v.min_length for v in password_validation.get_default_password_validators() if hasattr(v, "min_length")]
    return max(lengths, default=1)


class PasswordField(serializers.CharField):
    """Checked by Django's password validators when the user is created (``weak_password``);
    the schema states the rules it can: the minimum length and "not only digits"."""

    schema_overrides: ClassVar[dict[str, object]] = {
        "minLength": _password_min_length(),
        "pattern": r"^[^\u0000]*[^0-9\u0000][^\u0000]*$",  # no NUL (as any CharField), not only digits
    }


class SignupSerializer(StrictSerializer):
    email = serializers.EmailField(max_length=254)
    password = PasswordField(
        max_length=128,
        write_only=True,
        trim_whitespace=False,
        help_text=(
            f"At least {_password_min_length()} characters, not only digits, not a commonly used password "
            "and not too similar to the email; refused with `weak_password` naming the rule."
        ),
    )


class SignupResponseSerializer(serializers.Serializer):
    id = serializers.CharField(help_text="`usr_…`")
    email = serializers.EmailField()
    api_key = serializers.CharField(help_text="Shown once. Send it as `Authorization: Bearer …`.")


class ApiKeySerializer(StrictSerializer):
    id = serializers.CharField(source="public_id", read_only=True, help_text="`key_…`")
    name = serializers.CharField(max_length=100)
    prefix = serializers.CharField(read_only=True, help_text="The key's public prefix, to recognise it.")
    created_at = serializers.DateTimeField(read_only=True)
    last_used_at = serializers.DateTimeField(read_only=True, allow_null=True)
    revoked_at = serializers.DateTimeField(read_only=True, allow_null=True)


class ApiKeyCreatedSerializer(ApiKeySerializer):
    api_key = serializers.CharField(read_only=True, help_text="Shown once.")


class AddressSerializer(StrictSerializer):
    line1 = serializers.CharField(source="address_line1", max_length=200)
    line2 = serializers.CharField(source="address_line2", max_length=200, required=False, allow_blank=True)
    city = serializers.CharField(source="address_city", max_length=100)
    postal_code = serializers.CharField(source="address_postal_code", max_length=32)
    region = serializers.CharField(source="address_region", max_length=100, required=False, allow_blank=True)


@extend_schema_field({"type": "string", "format": "decimal", "example": "2500.00"})
class AccountAmountField(serializers.Field):
    """A decimal attribute of the account in its currency, shown with exactly the currency's
    minor-unit places ("2500.00" EUR, "2500" JPY), whatever places the column keeps."""

    def __init__(self, attribute: str, **kwargs: Any) -> None:
        self.attribute = attribute
        super().__init__(source="*", read_only=True, **kwargs)

    def to_representation(self, account: BillingAccount) -> str:
        return money.format_amount(getattr(account, self.attribute), account.currency)


class BillingAccountSerializer(StrictSerializer):
    id = serializers.CharField(source="public_id", read_only=True, help_text="`acc_…`")
    name = serializers.CharField(max_length=200)
    email = serializers.EmailField(max_length=254)
    kind = serializers.ChoiceField(choices=AccountKind.choices)
    country = CodeField(
        choices=COUNTRY_CHOICES,
        code="invalid_country",
        message="'{value}' is not an ISO 3166-1 alpha-2 country code in upper case, such as NL.",
        help_text="ISO 3166-1 alpha-2, upper case, e.g. `NL`.",
    )
    currency: serializers.Field = CodeField(
        choices=[(code, code) for code in settings.BILLING_CURRENCIES],
        code="unsupported_currency",
        message=f"'{{value}}' is not a supported currency; use one of {', '.join(settings.BILLING_CURRENCIES)}.",
        help_text="ISO 4217, upper case: one of the currencies this deployment bills in (`BILLING_CURRENCIES`).",
    )
    tax_id = serializers.CharField(
        max_length=32, required=False, allow_blank=True, help_text="EU VAT numbers are checked, checksum included."
    )
    phone = serializers.CharField(
        max_length=32,
        required=False,
        allow_blank=True,
        help_text="A contact number, international (`+31 20 123 4567`) or in the account's country's own form; "
        "stored as E.164 (`invalid_phone` when libphonenumber finds it invalid).",
    )
    address = AddressSerializer(source="*")
    state = serializers.ChoiceField(choices=AccountState.choices, read_only=True)
    credit_limit = AccountAmountField(
        "credit_limit", help_text="Set by finance; in the account's currency, with its minor-unit places."
    )
    created_at = serializers.DateTimeField(read_only=True)
    updated_at = serializers.DateTimeField(read_only=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        instance: BillingAccount | None = self.instance
        country = attrs.get("country", instance.country.code if instance else "")
        # Checked against the country (the one sent, else the stored one) when either changes.
        for name, normalize, code in (
            ("tax_id", validation.normalize_tax_id, "invalid_tax_id"),
            ("phone", validation.normalize_phone, "invalid_phone"),
        ):
            value = attrs.get(name, getattr(instance, name) if instance else "")
            if (name in attrs or "country" in attrs) and value:
                try:
                    attrs[name] = normalize(country, value)
                except ValueError as exc:
                    raise serializers.ValidationError({name: [str(exc)]}, code=code) from exc
        return attrs


class BillingAccountUpdateSerializer(BillingAccountSerializer):
    """PATCH: profile fields only; the currency is fixed once the account exists."""

    currency = serializers.CharField(read_only=True)


class TransitionRequestSerializer(StrictSerializer):
    reason = serializers.CharField(max_length=2000, help_text="Why; kept in the account's history.")


class ActorSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["user", "operator", "system"])
    name = serializers.CharField()


# What customers read of our transitions, by (transition, cause); a transition with a cause
# not listed reads as its ("", cause) entry. Never staff's or a fraud rule's own words (those
# are internal, and would tell a fraudster what tripped), but always why it really happened.
PUBLIC_REASONS = {
    ("activate", ""): "Account activated.",
    ("suspend", "debt"): "Suspended for an unpaid balance.",
    ("suspend", "fraud"): "Account under review. Contact support.",
    ("suspend", ""): "Suspended by support. Contact support for details.",
    ("reactivate", "debt_settled"): "Balance settled; reactivated.",
    ("reactivate", ""): "Reactivated by support.",
    ("block", ""): "Account under review. Contact support.",
    ("unblock", ""): "Review completed.",
    ("close", ""): "Account closed.",
    ("close", "staff"): "Account closed by support.",
}


def public_reason(transition: str, cause: str) -> str:
    return PUBLIC_REASONS.get((transition, cause)) or PUBLIC_REASONS.get((transition, ""), "")


class HistoryEntrySerializer(serializers.Serializer):
    transition = serializers.CharField()
    from_state = serializers.ChoiceField(choices=AccountState.choices)
    to_state = serializers.ChoiceField(choices=AccountState.choices)
    actor = serializers.SerializerMethodField()
    reason = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()

    @extend_schema_field(ActorSerializer)
    def get_actor(self, entry: Any) -> dict[str, str]:
        # Customers see staff as "support" and our components as "billing": neither staff
        # emails nor which internal rule acted leave the building.
        name = {"operator": "support", "system": "billing"}.get(entry.actor_kind, entry.actor_name)
        return {"kind": entry.actor_kind, "name": name}

    def get_reason(self, entry: Any) -> str:
        # A customer's own words come back as written; ours are internal (a fraud rule's
        # reason would tell a fraudster what tripped it), so customers get a public one.
        if entry.actor_kind == "user":
            return str(entry.reason)
        return public_reason(entry.transition, entry.cause)


class MemberSerializer(serializers.Serializer):
    user_id = serializers.CharField(source="user.public_id", read_only=True, help_text="`usr_…`")
    email = serializers.EmailField(source="user.email", read_only=True)
    role = serializers.ChoiceField(choices=MemberRole.choices, read_only=True)
    created_at = serializers.DateTimeField(read_only=True)


class MemberAddSerializer(StrictSerializer):
    email = serializers.EmailField(max_length=254)
    role = serializers.ChoiceField(choices=[MemberRole.ADMIN, MemberRole.VIEWER])
