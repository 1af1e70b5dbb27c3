"""Profile rules shared by the API and the admin: the tax id and the phone number (country and
currency are closed lists)."""

from __future__ import annotations

import re

import phonenumbers
import stdnum
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError as StdnumError

from billing_site.common.countries import EU_COUNTRIES

# EU VAT numbers carry the member state's prefix; Greece uses EL, Northern Ireland XI.
_VAT_PREFIX = {"GR": "EL"}
_GENERIC_TAX_ID = re.compile(r"^[A-Z0-9]{2,32}$")


def normalize_tax_id(country: str, value: str) -> str:
    """The compact, validated form of ``value`` for a customer in ``country``.

    EU member states: a VAT number with its checksum (python-stdnum), prefixed with the
    member state's code, which must be the customer's country. Elsewhere: the country's
    own VAT/GST format where python-stdnum knows it, else 2-32 letters and digits.
    """
    raw = value.strip()
    if not raw:
        return ""
    if country in EU_COUNTRIES:
        number = eu_vat.compact(raw)
        prefix = _VAT_PREFIX.get(country, country)
        if number[:2].isdigit():
            number = prefix + number
        if number[:2] != prefix:
            raise ValueError(f"A VAT number for {country} must start with {prefix}.")
        try:
            return str(eu_vat.validate(number))
        except StdnumError as exc:
            raise ValueError(f"'{value}' is not a valid EU VAT number: {exc}") from exc
    module = stdnum.get_cc_module(country.lower(), "vat")
    if module is not None:
        try:
            return str(module.validate(raw))
        except StdnumError as exc:
            raise ValueError(f"'{value}' is not a valid {country} VAT number: {exc}") from exc
    compact = re.sub(r"[\s.\-/]", "", raw).upper()
    if not _GENERIC_TAX_ID.match(compact):
        raise ValueError(f"'{value}' is not a valid tax id: use 2-32 letters and digits.")
    return compact


def normalize_phone(country: str, value: str) -> str:
    """``value`` as E.164 (``+31201234567``): international form, or national form read in the
    account's ``country``; refused unless libphonenumber (phonenumberslite) finds it valid."""
    raw = value.strip()
    if not raw:
        return ""
    try:
        number = phonenumbers.parse(raw, country or None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"'{value}' is not a phone number: give it as +<country code> <number>.") from exc
    if not phonenumbers.is_valid_number(number):
        raise ValueError(f"'{value}' is not a valid phone number.")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))
