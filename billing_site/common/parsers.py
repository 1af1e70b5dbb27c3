"""The API's JSON body parser: DRF's, with its failure modes turned into 4xx."""

from __future__ import annotations

from typing import Any

from rest_framework import parsers
from rest_framework.exceptions import ParseError


class JSONParser(parsers.JSONParser):
    """DRF's ``JSONParser``; a body nested deeper than Python's recursion limit (``[[[[…`` a
    thousand deep) is a 400 ``malformed_request`` instead of a ``RecursionError`` and a 500.
    (Bodies over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` are a 413: see ``common/errors.py``.)"""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None
