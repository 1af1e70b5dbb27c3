"""``POST /api/v1/usage/events``: a thin door onto ``metering.ingest``."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import OpenApiExample, extend_schema, inline_serializer
from rest_framework import permissions, serializers
from rest_framework.parsers import BaseParser
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.authentication import caller_of
from accounts.models import Scope
from billing_site.common.errors import ApplicationError, error_responses
from billing_site.common.views import StrictQueryMixin
from metering import ingest


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
    "quantity": serializers.DecimalField(
        max_digits=25, decimal_places=12, required=False, help_text="usage: >= 0, <= 10^12"
    ),
    "resource_id": serializers.CharField(max_length=256, required=False),
    "action": serializers.ChoiceField(choices=["start", "update", "stop"], required=False),
    "spec": serializers.DictField(
        child=serializers.DecimalField(max_digits=25, decimal_places=12),
        required=False,
        help_text="resource start/update: duration SKU code → units",
    ),
    "labels": serializers.DictField(child=serializers.CharField(max_length=256), required=False),
}
_BATCH = inline_serializer(
    name="UsageEventBatch",
    fields={"events": inline_serializer(name="UsageEventIn", fields=_EVENT_FIELDS, many=True, max_length=10_000)},
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
                    choices=["invalid", "unknown_account", "unknown_sku", "too_old", "in_future", "conflict"]
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
            "Up to 10,000 events and 10 MB per batch. Exactly once per `(account_id, id)`: "
            "resending an identical event counts it as a duplicate and changes nothing; the same id "
            "with different content is a `conflict`. Good events are accepted even when others in the "
            "batch are rejected. A 200 means every accepted event is durable."
        ),
        request=_BATCH,
        responses={200: _RESULT, **error_responses(400, 401, 403, 413, 415)},
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
                            "spec": {"compute.vcpu": 2, "compute.ram": "4"},
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
        return Response(result.as_dict())
