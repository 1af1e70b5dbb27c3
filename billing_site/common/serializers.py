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


class CodeField(serializers.ChoiceField):
    """One code of a closed list, exactly as listed: no case folding or trimming, so the
    schema's ``enum`` is the whole rule. Anything else is refused with a domain ``code``
    (``invalid_country``) rather than DRF's generic ``invalid_choice``."""

    def __init__(self, *, choices: Any, code: str, message: str, **kwargs: Any) -> None:
        self.code = code
        self.message = message  # may name the value as {value}
        super().__init__(choices=choices, **kwargs)

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str) and data in self.choice_strings_to_values:
            return self.choice_strings_to_values[data]
        raise serializers.ValidationError(self.message.format(value=data), code=self.code)
