"""``POST /api/v1/usage/events``: a thin door onto ``metering.ingest``."""

from __future__ import annotations

import datetime as dt
import re
from decimal import Decimal
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, extend_schema, inline_serializer
from rest_framework import permissions, serializers
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import selectors as account_selectors
from accounts.authentication import Scope, caller_of
from billing_site.common.errors import ApplicationError, error_responses
from billing_site.common.schema import closed_inline_serializer
from billing_site.common.views import StrictQueryMixin
from metering import eventlog, ingest, selectors


class HasUsageWriteScope(permissions.BasePermission):
    message = "This endpoint needs a service key with the usage:write scope."

    def has_permission(self, request: Request, view: Any) -> bool:
        caller = caller_of(request)
        return caller.is_service and caller.has_scope(Scope.USAGE_WRITE)


class RawBodyParser(BaseParser):
    """Hands the view the undecoded body (read up to the size limit): msgspec does the rest."""

    media_type = "application/json"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        if stream is None:
            return b""
        body: bytes = stream.read(ingest.MAX_BODY_BYTES + 1)
        return body


_EVENT_FIELDS: dict[str, serializers.Field] = {
    "id": serializers.CharField(max_length=128, help_text="Your idempotency key, unique per billing account."),
    "account_id": serializers.CharField(help_text="`acc_…`"),
    "time": serializers.DateTimeField(help_text="RFC 3339 with an offset."),
    "type": serializers.ChoiceField(choices=["usage", "resource"]),
    "sku": serializers.CharField(required=False, help_text="usage: a quantity SKU"),
    "quantity": serializers.RegexField(
        ingest.QUANTITY_PATTERN,
        required=False,
        help_text=(
            "usage: a decimal string, up to 12 digits, optionally a point and up to 12 more "
            '(`"1.25"`; no sign, exponent or spaces; JSON numbers are refused, as they become binary floats '
            "in many producers)"
        ),
    ),
    "resource_id": serializers.CharField(max_length=256, required=False),
    "action": serializers.ChoiceField(choices=["start", "update", "stop"], required=False),
    "spec": serializers.DictField(
        child=serializers.RegexField(ingest.QUANTITY_PATTERN),
        required=False,
        help_text="resource start/update: duration SKU code → units, each a decimal string like `quantity`",
    ),
    "labels": serializers.DictField(child=serializers.CharField(max_length=256), required=False),
}
# Unknown fields are refused (msgspec's forbid_unknown_fields): the batch's with a 400, an event's
# by rejecting that event.
_BATCH = closed_inline_serializer(
    name="UsageEventBatch",
    fields={
        "events": closed_inline_serializer(name="UsageEventIn", fields=_EVENT_FIELDS, many=True, max_length=10_000)
    },
)
_RESULT = inline_serializer(
    name="UsageIngestResult",
    fields={
        "accepted": serializers.IntegerField(),
        "duplicates": serializers.IntegerField(),
        "rejected": inline_serializer(
            name="UsageEventRejection",
            fields={
                "index": serializers.IntegerField(),
                "id": serializers.CharField(allow_null=True),
                "code": serializers.ChoiceField(
                    choices=[
                        "invalid",
                        "unknown_account",
                        "account_closed",
                        "unknown_sku",
                        "too_old",
                        "in_future",
                        "conflict",
                    ]
                ),
                "message": serializers.CharField(),
            },
            many=True,
        ),
    },
)


class UsageEventsView(StrictQueryMixin, APIView):
    permission_classes = [permissions.IsAuthenticated, HasUsageWriteScope]
    parser_classes = [RawBodyParser]

    @extend_schema(
        operation_id="usage_events_ingest",
        summary="Send a batch of usage and resource events",
        description=(
            "Up to 10,000 events and 10 MB per batch. Exactly once per `(account_id, id)`: an event sent "
            "again is never counted twice. Good events are accepted even when others in the batch are "
            "rejected. A 200 means every accepted event is durable; a 503 `log_unavailable` (with "
            "`Retry-After`) means nothing of the batch was accepted: send it again. Which duplicates are "
            "reported: with the single-machine event store (PostgreSQL) every resent event is counted in "
            "`duplicates` and the same id with different content is a `conflict`; on the scale path "
            "(ClickHouse behind a log) only a byte-identical resend of a batch is reported as `duplicates` "
            "(from its fingerprint), other resends are `accepted` and counted once in costs and invoices, and "
            "of two different contents under one id within one hour one counts (the same one every time)."
        ),
        request=_BATCH,
        responses={200: _RESULT, **error_responses(400, 401, 403, 413, 415, 503)},
        examples=[
            OpenApiExample(
                "A VM start and some egress",
                request_only=True,
                value={
                    "events": [
                        {
                            "id": "vm-42-start",
                            "account_id": "acc_0k3x9m2q7t1vb",
                            "time": "2026-11-25T10:00:00Z",
                            "type": "resource",
                            "resource_id": "vm-42",
                            "action": "start",
                            "spec": {"compute.vcpu": "2", "compute.ram": "4"},
                            "labels": {"project": "web"},
                        },
                        {
                            "id": "egress-1",
                            "account_id": "acc_0k3x9m2q7t1vb",
                            "time": "2026-11-25T10:05:00Z",
                            "type": "usage",
                            "sku": "network.egress",
                            "quantity": "1.25",
                        },
                    ]
                },
            )
        ],
    )
    def post(self, request: Request) -> Response:
        body = request.data
        try:
            result = ingest.ingest(body if isinstance(body, bytes) else b"")
        except ingest.BatchError as exc:
            raise ApplicationError(exc.code, exc.message, status=exc.status, field=exc.field) from exc
        except eventlog.LogUnavailable as exc:
            # Nothing of the batch is stored or counted: the client sends it again (the same
            # bytes are answered from their fingerprint if a copy did reach the log).
            raise ApplicationError(
                "log_unavailable",
                "The event log could not acknowledge the batch (a leader election, most likely); nothing was "
                "accepted. Send the same batch again after Retry-After seconds.",
                status=503,
                retry_after=exc.retry_after,
            ) from exc
        return Response(result.as_dict())


def _cost_row(**kwargs: Any) -> serializers.Serializer:
    return inline_serializer(
        name="CostRow",
        fields={
            "period": serializers.CharField(help_text="`2026-10-01` (day, month) or `2026-10-01T13:00:00Z` (hour)"),
            "sku": serializers.CharField(required=False),
            "resource": serializers.CharField(required=False, help_text="'' for usage not tied to a resource"),
            "labels": serializers.DictField(
                child=serializers.CharField(allow_null=True), required=False, help_text="asked label key → value"
            ),
            "quantity": serializers.CharField(
                required=False,
                help_text="decimal string, exact and rounded half-up to at most 6 places with no trailing zeros, "
                "as on invoices (`744`, `122316.2`); only when grouped by sku",
            ),
            "amount": serializers.CharField(help_text="decimal string, full precision"),
        },
        **kwargs,
    )


_COSTS = inline_serializer(
    name="CostBreakdown",
    fields={
        "currency": serializers.CharField(),
        "start": serializers.DateField(),
        "end": serializers.DateField(),
        "granularity": serializers.ChoiceField(choices=list(selectors.GRANULARITIES)),
        "group_by": serializers.ListField(child=serializers.CharField()),
        "total": serializers.CharField(help_text="decimal string, full precision"),
        "rows": _cost_row(many=True),
    },
)


# group_by: up to 8 distinct dimensions, comma-separated, no spaces (documented as a form array).
_DIMENSION = r"sku|resource|label:[^,\u0000]{1,64}"


class CostQuerySerializer(serializers.Serializer):
    start = serializers.DateField(
        help_text="First day, UTC (inclusive); from year 2000. At `hour` granularity, not before the first day of "
        "the month `METERING_HOURLY_RETENTION_MONTHS` months before the current one (older hours are dropped; "
        "their days are kept)."
    )
    end = serializers.DateField(
        help_text="Day after the last, UTC (exclusive): after `start`, and at most "
        + ", ".join(f"{days} days later at `{name}`" for name, days in selectors.MAX_RANGE_DAYS.items())
        + " granularity."
    )
    granularity = serializers.ChoiceField(choices=list(selectors.GRANULARITIES), default="day")
    group_by = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False)

    def validate_group_by(self, value: str) -> list[str]:
        parts = value.split(",") if value else []
        for part in parts:
            if not re.fullmatch(_DIMENSION, part):
                raise serializers.ValidationError(f"'{part}': use sku, resource or label:<key>, no spaces.")
        if len(parts) != len(set(parts)):
            raise serializers.ValidationError("A dimension appears twice.")
        if len(parts) > 8:
            raise serializers.ValidationError("At most 8 dimensions.")
        return parts

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["end"] <= attrs["start"]:
            raise serializers.ValidationError({"end": ["Must be after start."]})
        limit = selectors.MAX_RANGE_DAYS[attrs["granularity"]]
        if (attrs["end"] - attrs["start"]).days > limit:
            raise serializers.ValidationError({"end": [f"At most {limit} days at {attrs['granularity']} granularity."]})
        if attrs["start"].year < 2000 or attrs["end"].year > 9998:
            raise serializers.ValidationError({"start": ["Out of range."]})
        if attrs["granularity"] == "hour":
            # Hours of older months are dropped (their days and months are kept): asking for
            # them would show a month with nothing in it.
            kept_from = selectors.hourly_kept_from(timezone.now()).date()
            if attrs["start"] < kept_from:
                raise serializers.ValidationError(
                    {
                        "start": [
                            f"Hourly detail is kept from {kept_from.isoformat()}; ask for day or month granularity."
                        ]
                    }
                )
        return attrs


_GROUP_BY = OpenApiParameter(
    "group_by",
    {
        "type": "array",
        "items": {"type": "string", "pattern": f"^({_DIMENSION})$"},
        "uniqueItems": True,
        "maxItems": 8,
    },
    style="form",
    explode=False,
    description="Comma list of up to 8 distinct `sku`, `resource`, `label:<key>`, no spaces (`sku,label:project`).",
)


def _decimal(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


class CostBreakdownView(StrictQueryMixin, APIView):
    allowed_query_params = ("start", "end", "granularity", "group_by")

    @extend_schema(
        operation_id="billing_accounts_costs",
        summary="Cost breakdown of a billing account",
        description=(
            "Rated usage summed by period and by the asked dimensions, in the account's currency, at full "
            "precision (rounding happens on invoices). Reads the hourly rollups, which the rollup keeps "
            "within a minute of the events; running resources accrue up to the last full hour."
        ),
        parameters=[CostQuerySerializer, _GROUP_BY],
        responses={200: _COSTS, **error_responses(400, 401, 404)},
    )
    def get(self, request: Request, account_id: int) -> Response:
        account = account_selectors.billing_account_get_for_caller(caller=caller_of(request), account_id=account_id)
        query = CostQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        dims: list[str] = params.get("group_by") or []
        start = dt.datetime.combine(params["start"], dt.time(), tzinfo=dt.UTC)
        end = dt.datetime.combine(params["end"], dt.time(), tzinfo=dt.UTC)
        rows, total = selectors.cost_breakdown(
            selectors.CostQuery(
                account_id=account.id,
                start=start,
                end=end,
                granularity=params["granularity"],
                by_sku="sku" in dims,
                by_resource="resource" in dims,
                label_keys=tuple(d.removeprefix("label:") for d in dims if d.startswith("label:")),
            )
        )
        for row in rows:
            period: dt.datetime = row["period"]
            row["period"] = (
                period.strftime("%Y-%m-%dT%H:%M:%SZ") if params["granularity"] == "hour" else period.date().isoformat()
            )
            row["amount"] = _decimal(row["amount"])
            if "quantity" in row:
                row["quantity"] = selectors.quantity_text(row["quantity"])
        return Response(
            {
                "currency": account.currency,
                "start": params["start"].isoformat(),
                "end": params["end"].isoformat(),
                "granularity": params["granularity"],
                "group_by": dims,
                "total": _decimal(total),
                "rows": rows,
            }
        )
