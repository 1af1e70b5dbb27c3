"""What a browser would post from a rendered admin page: its forms' fields as rendered."""

from __future__ import annotations

from html.parser import HTMLParser


class FormFields(HTMLParser):
    """The named fields of a page's forms with their rendered values: text inputs and hidden
    ones, textareas, the selected option of each select, checkboxes and radios only when
    checked (as a browser submits them). ``names`` has every named field, posted or not."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fields: dict[str, str] = {}
        self.names: set[str] = set()
        self._textarea: str | None = None
        self._select: str | None = None
        self._first_option: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v if v is not None else "" for k, v in attrs}
        name = a.get("name", "")
        if tag == "input" and name:
            self.names.add(name)
            kind = a.get("type", "text")
            if kind in ("submit", "button", "image", "file"):
                return
            if kind in ("checkbox", "radio") and "checked" not in a:
                return
            self.fields[name] = a.get("value", "on" if kind in ("checkbox", "radio") else "")
        elif tag == "textarea" and name:
            self.names.add(name)
            self._textarea = name
            self.fields[name] = ""
        elif tag == "select" and name:
            self.names.add(name)
            self._select = name
        elif tag == "option" and self._select:
            value = a.get("value", "")
            self._first_option.setdefault(self._select, value)
            if "selected" in a:
                self.fields[self._select] = value

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.fields[self._textarea] += data.removeprefix("\n") if not self.fields[self._textarea] else data

    def handle_endtag(self, tag: str) -> None:
        if tag == "textarea":
            self._textarea = None
        elif tag == "select" and self._select:
            self.fields.setdefault(self._select, self._first_option.get(self._select, ""))
            self._select = None


def form_of(html: bytes | str) -> FormFields:
    parser = FormFields()
    parser.feed(html.decode() if isinstance(html, bytes) else html)
    return parser
