from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail


class StrictSerializer(serializers.Serializer):
    """Rejects any field it does not know or may not write, naming each one: no silent
    mass assignment (``state``, ``credit_limit``, … → 400 ``read_only`` / ``unknown_field``)."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, Mapping):
            errors: dict[str, list[ErrorDetail]] = {}
            for key in data:
                field = self.fields.get(key)
                if field is None:
                    errors[key] = [ErrorDetail("Unknown field.", code="unknown_field")]
                elif field.read_only:
                    errors[key] = [ErrorDetail("This field cannot be written.", code="read_only")]
                elif isinstance(field, serializers.CharField | serializers.ChoiceField) and not isinstance(
                    data[key], str
                ):
                    # DRF would turn 0 into "0": a client sending the wrong type has a bug to hear about.
                    errors[key] = [ErrorDetail("Must be a string.", code="invalid_type")]
            if errors:
                raise serializers.ValidationError(errors)
        return super().to_internal_value(data)
