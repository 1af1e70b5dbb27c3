"""System checks of the seller printed on every invoice and credit note (``manage.py check``,
and every ``runserver``/``migrate``): an EU invoice that cannot be sent is a configuration
error, caught before the first period close rather than on the first customer's complaint.

python-stdnum checks the formats and checksums offline: the VAT number (that of the seller's
member state), the IBAN (and that the BIC is of the same country and, where the IBAN carries
it, the same bank), the BIC; a Dutch company registration is the 8-digit KvK number. Whether
the numbers exist (VIES, the KvK register) is a network question and is not asked here.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.core import checks
from stdnum import bic, iban
from stdnum.eu import vat as eu_vat
from stdnum.exceptions import ValidationError as StdnumError

_VAT_PREFIX = {"GR": "EL"}
_KVK = re.compile(r"^\d{8}$")
# IBAN countries whose BBAN starts with the bank's four-letter code, the BIC's first four.
_BANK_CODE_IN_IBAN = frozenset({"NL", "GB", "IE"})


def _error(id_: int, msg: str, hint: str) -> checks.Error:
    return checks.Error(msg, hint=hint, id=f"invoicing.E{id_:03d}")


@checks.register("invoicing")
def seller_is_complete(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    country = settings.INVOICING_SELLER_COUNTRY
    vat_id = settings.INVOICING_SELLER_VAT_ID
    registration = settings.INVOICING_SELLER_REGISTRATION_ID
    account, bank = settings.INVOICING_SELLER_IBAN, settings.INVOICING_SELLER_BIC
    problems: list[checks.CheckMessage] = []

    prefix = _VAT_PREFIX.get(country, country)
    if country.lower() in eu_vat.MEMBER_STATES and not (vat_id.startswith(prefix) and eu_vat.is_valid(vat_id)):
        problems.append(
            _error(
                1,
                f"INVOICING_SELLER_VAT_ID {vat_id!r} is not a valid VAT number of {country}.",
                f"Set the seller's own VAT number, {prefix} followed by its digits (checksum included).",
            )
        )
    if not registration:
        problems.append(
            _error(
                2,
                "INVOICING_SELLER_REGISTRATION_ID is empty.",
                "Set the seller's company registration number (NL: the 8-digit KvK number); an EU invoice carries it.",
            )
        )
    elif country == "NL" and not _KVK.match(registration):
        problems.append(
            _error(
                2,
                f"INVOICING_SELLER_REGISTRATION_ID {registration!r} is not a KvK number.",
                "A Dutch company's registration is its 8-digit Chamber of Commerce (KvK) number.",
            )
        )
    try:
        iban.validate(account)
    except StdnumError as exc:
        problems.append(
            _error(
                3, f"INVOICING_SELLER_IBAN {account!r} is not a valid IBAN ({exc}).", "Set the IBAN customers pay to."
            )
        )
        account = ""
    try:
        bic.validate(bank)
    except StdnumError as exc:
        problems.append(
            _error(
                4,
                f"INVOICING_SELLER_BIC {bank!r} is not a valid BIC ({exc}).",
                "Set the BIC (SWIFT code) of the bank holding INVOICING_SELLER_IBAN.",
            )
        )
        bank = ""
    if account and bank:
        if bank[4:6] != account[:2]:
            problems.append(
                _error(
                    5,
                    f"INVOICING_SELLER_BIC {bank} is of {bank[4:6]}, the IBAN of {account[:2]}.",
                    "Give the BIC of the bank that holds the IBAN.",
                )
            )
        elif account[:2] in _BANK_CODE_IN_IBAN and account[4:8] != bank[:4]:
            problems.append(
                _error(
                    5,
                    f"INVOICING_SELLER_BIC {bank} is not of the IBAN's bank ({account[4:8]}).",
                    "Give the BIC of the bank that holds the IBAN.",
                )
            )
    if not settings.INVOICING_SELLER_BANK_NAME:
        problems.append(_error(6, "INVOICING_SELLER_BANK_NAME is empty.", "Set the name of the bank holding the IBAN."))
    return problems
