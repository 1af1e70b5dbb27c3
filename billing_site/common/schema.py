"""OpenAPI schema extensions: the schema says what the server enforces (the schemathesis run
in ``tests/test_openapi.py`` holds both to it). Imported by ``billing_site/urls.py`` so that
drf-spectacular finds them before it builds the schema."""

from __future__ import annotations

import inspect
from typing import Any

from drf_spectacular.extensions import OpenApiSerializerExtension
from rest_framework import serializers

from billing_site.common.serializers import StrictSerializer

# What Python's str.strip() removes (str.isspace()), spelled so that Python and ECMA regexes
# read it the same way (ECMA's \s differs: it has U+FEFF, lacks U+001C-U+001F and U+0085).
_WHITESPACE = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028-\u2029\u202f\u205f\u3000"
# DRF's CharField refuses NUL anywhere; one that trims and may not be blank also needs a
# character that is not whitespace.
NO_NUL_PATTERN = r"^[^\u0000]*$"
NOT_BLANK_PATTERN = rf"^[^\u0000]*[^\u0000{_WHITESPACE}][^\u0000]*$"


def _partial_nested(serializer: Any) -> bool:
    """A nested serializer inside a PATCH (``partial=True``) body: DRF makes it partial too."""
    root = getattr(serializer, "root", serializer)
    return root is not serializer and bool(getattr(root, "partial", False))


class StrictSerializerExtension(OpenApiSerializerExtension):
    """Request bodies of a ``StrictSerializer`` refuse fields they do not know (and read-only
    ones): ``additionalProperties: false``. Its string fields get the pattern DRF enforces
    (no NUL; something besides whitespace unless blank is allowed); a field may add its own
    constraints in ``schema_overrides``. An object nested in a PATCH body is partial as well."""

    target_class = StrictSerializer
    match_subclasses = True

    def get_name(self, auto_schema: Any, direction: str) -> str | None:
        if direction == "request" and _partial_nested(self.target):
            return "Patched" + type(self.target).__name__.removesuffix("Serializer")
        return None

    def map_serializer(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if schema.get("description") == inspect.getdoc(StrictSerializer):
            del schema["description"]  # the base class's docstring, inherited: not this object's
        if direction != "request":
            return schema
        schema["additionalProperties"] = False
        if _partial_nested(self.target):
            schema.pop("required", None)
        fields = self.target.fields
        for name, prop in schema.get("properties", {}).items():
            field = fields.get(name)
            if field is None:
                continue
            if (
                isinstance(field, serializers.CharField)
                and not isinstance(field, serializers.EmailField)  # its format says more
                and prop.get("type") == "string"
                and "pattern" not in prop
            ):
                blank_ok = field.allow_blank or not field.trim_whitespace
                prop["pattern"] = NO_NUL_PATTERN if blank_ok else NOT_BLANK_PATTERN
            prop.update(getattr(field, "schema_overrides", {}))
        return schema


class ClosedObject(serializers.Serializer):
    """Base of a documentation-only serializer for a body parsed elsewhere (msgspec with
    ``forbid_unknown_fields``): its request schema says ``additionalProperties: false``."""


class ClosedObjectExtension(OpenApiSerializerExtension):
    target_class = ClosedObject
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: str) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        if schema.get("description") == inspect.getdoc(ClosedObject):
            del schema["description"]
        if direction == "request":
            schema["additionalProperties"] = False
        return schema


def closed_inline_serializer(name: str, fields: dict[str, serializers.Field], **kwargs: Any) -> serializers.Serializer:
    """drf-spectacular's ``inline_serializer`` for a body that refuses unknown fields."""
    return type(name, (ClosedObject,), fields)(**kwargs)


def trim_enum_descriptions(result: dict[str, Any], generator: Any, request: Any, public: bool) -> dict[str, Any]:
    """After drf-spectacular's enum hook: a property that refers to an enum component keeps
    its own help text only; the list of choices lives once, on the component (not 249 country
    names repeated on every property that takes a country)."""
    for component in result.get("components", {}).get("schemas", {}).values():
        for prop in component.get("properties", {}).values():
            description = prop.get("description", "")
            if "allOf" in prop and "\n\n*" in description:
                prop["description"] = description.partition("\n\n*")[0]
    return result
