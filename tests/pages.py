"""Admin pages as a browser sees them: the forms of a rendered page (html.parser) with the
HTML5 form rules a browser applies (a ``<form>`` inside an open form is ignored, and its
fields belong to the outer one; ``</form>`` closes the open form), and what a browser posts
when one of their buttons is pressed; or all the page's fields at once (``form_of``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from django.test import Client


@dataclass
class Form:
    action: str
    method: str
    fields: list[tuple[str, str]] = field(default_factory=list)  # successful controls, in order
    buttons: list[tuple[str, str]] = field(default_factory=list)  # (name, value) of each submit
    textareas: list[str] = field(default_factory=list)
    names: set[str] = field(default_factory=set)  # every named control, posted or not


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[Form] = []
        self.open: Form | None = None
        self.textarea: tuple[str, list[str]] | None = None
        self.select: str | None = None
        self.select_value: str | None = None

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: v or "" for k, v in attrs_list}
        if tag == "form":
            if self.open is None:  # a form inside an open form is ignored by the browser
                self.open = Form(action=attrs.get("action", ""), method=attrs.get("method", "get").lower())
                self.forms.append(self.open)
            return
        if self.open is None:
            return
        name = attrs.get("name", "")
        if name and tag in ("input", "button", "textarea", "select"):
            self.open.names.add(name)
        if tag == "input":
            kind = attrs.get("type", "text").lower()
            if kind in ("submit", "image"):
                self.open.buttons.append((name, attrs.get("value", "")))
            elif kind in ("checkbox", "radio"):
                if "checked" in attrs and name:
                    self.open.fields.append((name, attrs.get("value", "on")))
            elif name and "disabled" not in attrs:
                self.open.fields.append((name, attrs.get("value", "")))
        elif tag == "button" and attrs.get("type", "submit").lower() == "submit":
            self.open.buttons.append((name, attrs.get("value", "")))
        elif tag == "textarea" and name:
            self.textarea = (name, [])
            self.open.textareas.append(name)
        elif tag == "select" and name:
            self.select, self.select_value = name, None
        elif tag == "option" and self.select is not None and ("selected" in attrs or self.select_value is None):
            self.select_value = attrs.get("value", "")

    def handle_data(self, data: str) -> None:
        if self.textarea is not None:
            self.textarea[1].append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.open = None
        elif tag == "textarea" and self.textarea is not None and self.open is not None:
            name, text = self.textarea
            self.open.fields.append((name, "".join(text).removeprefix("\n")))
            self.textarea = None
        elif tag == "select" and self.select is not None and self.open is not None:
            if self.select_value is not None:
                self.open.fields.append((self.select, self.select_value))
            self.select = None


def forms_of(html: str) -> list[Form]:
    parser = _Forms()
    parser.feed(html)
    parser.close()
    return parser.forms


def form_with_button(html: str, label: str) -> Form:
    """The form a submit button labelled ``label`` submits, as the browser parsed the page."""
    found = [f for f in forms_of(html) if any(value == label for _, value in f.buttons)]
    assert len(found) == 1, f"{len(found)} forms with a {label!r} button"
    return found[0]


def press(client: Client, url: str, label: str, **values: str) -> Any:
    """GET ``url``, fill the form of the button ``label`` with ``values`` (by field name; the
    rest as rendered) and post what the browser would, to the form's action (the page's own
    address when it has none)."""
    page = client.get(url)
    assert page.status_code == 200, page.status_code
    form = form_with_button(page.content.decode(), label)
    data: dict[str, Any] = {}
    for name, value in form.fields:
        data.setdefault(name, []).append(value)
    for name, value in values.items():
        assert name in data, f"no field {name!r} in the form of {label!r} (fields: {sorted(data)})"
        data[name] = [value]
    name = next(n for n, v in form.buttons if v == label)
    if name:
        data[name] = [label]
    assert form.method == "post"
    return client.post(form.action or url, data)


@dataclass
class PageFields:
    fields: dict[str, str]  # what the page's forms post, by name (the last of a name wins)
    names: set[str]  # every named control of the page's forms, posted or not


def form_of(html: bytes | str) -> PageFields:
    """The fields of every form of a rendered page together, as a browser would post them (for
    pages with one form, or whose forms do not share names)."""
    forms = forms_of(html.decode() if isinstance(html, bytes) else html)
    return PageFields(
        fields={name: value for form in forms for name, value in form.fields},
        names=set().union(*(form.names for form in forms)),
    )
