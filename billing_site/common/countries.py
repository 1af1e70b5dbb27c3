"""Country facts shared by every app (ISO 3166-1 alpha-2 codes)."""

from __future__ import annotations

from stdnum.eu import vat as eu_vat

# EU member states, from python-stdnum's VAT data (Northern Ireland's XI prefix is not a country).
EU_COUNTRIES = frozenset(code.upper() for code in eu_vat.MEMBER_STATES if code != "xi")
