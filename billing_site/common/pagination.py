from typing import Any

from rest_framework import exceptions
from rest_framework.pagination import CursorPagination
from rest_framework.request import Request


class CreatedCursorPagination(CursorPagination):
    """Stable cursor pagination, newest first; ``?cursor=`` from ``next``/``previous``."""

    ordering = "-created_at"
    page_size = 50
    page_size_query_param = "page_size"
    max_page_size = 500

    def decode_cursor(self, request: Request) -> Any:
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound as exc:  # a bad cursor is bad input, not a missing page
            raise exceptions.ValidationError({"cursor": ["Invalid cursor."]}) from exc
