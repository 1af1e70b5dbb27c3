import re
from typing import Any

from django.utils.dateparse import parse_datetime
from rest_framework import exceptions
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request


class CreatedCursorPagination(CursorPagination):
    """Stable cursor pagination, newest first; ``?cursor=`` from ``next``/``previous``.

    Bad paging parameters are a 400 naming the parameter, not silently replaced."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def get_page_size(self, request: Request) -> int:
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= self.max_page_size:
            raise exceptions.ValidationError(
                {self.page_size_query_param: [f"An integer from 1 to {self.max_page_size}."]}
            )
        return int(raw)

    def decode_cursor(self, request: Request) -> Any:
        if request.query_params.get(self.cursor_query_param) == "":
            raise exceptions.ValidationError({"cursor": ["Empty cursor: omit it for the first page."]})
        try:
            cursor = super().decode_cursor(request)
        except exceptions.NotFound as exc:  # a bad cursor is bad input, not a missing page
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]}) from exc
        # A cursor is only base64: a forged one could carry any position into the filter.
        if cursor is not None and cursor.position is not None and parse_datetime(str(cursor.position)) is None:
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]})
        return cursor

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
            if parameter["name"] == self.cursor_query_param:
                parameter["schema"] = {"type": "string", "minLength": 1}
                parameter["description"] = (
                    "Opaque: pass back the cursor of a `next` or `previous` link; omit it for the first page. "
                    "Anything else is a 400."
                )
        return parameters
