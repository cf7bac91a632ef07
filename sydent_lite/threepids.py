"""3PID and Matrix ID syntax: what counts as a valid address, and its stored form."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import email_validator
import phonenumbers
from email_validator import EmailNotValidError, validate_email

from sydent_lite.errors import ErrorCode, MatrixError

MAX_ADDRESS_LENGTH = 512
# RFC 5321 4.5.3.1.1: a local part is at most 64 octets.
MAX_LOCAL_PART_OCTETS = 64
# An RFC 2047 encoded word ("=?charset?q?...?="): a relay or mail client that decodes it would
# deliver to, or show, another address than the one validated.
_ENCODED_WORD_RE = re.compile(r"=\?.*\?=", re.S)

# Operators run on internal domains (.local, localhost, .test): check syntax, not where the
# domain sits. Emptying this list is email-validator's documented way to allow them.
email_validator.SPECIAL_USE_DOMAIN_NAMES[:] = []

# Spec appendix "User Identifiers": @localpart:server_name, at most 255 bytes. Localparts: the
# current grammar plus the historical one still found in the wild, restricted to printable
# ASCII (the spec calls anything else non-compliant); never ':'. The server name is checked
# loosely here (its characters): federation.resolver.parse_server_name checks its grammar.
_USER_ID_RE = re.compile(r"@([\x21-\x39\x3b-\x7e]+):([A-Za-z0-9.\-\[\]:]+)")
MAX_USER_ID_BYTES = 255


def normalise_email(address: object) -> str:
    """The stored form of an email address: case-folded, as given (appendix "3PID Types")."""
    return check_email(address).casefold()


def check_email(address: object) -> str:
    """The address exactly as given, once its syntax is checked: the mailbox to send to.

    Case folding is for matching 3PIDs, not for delivery: `Strauß.x@…` folds to `strauss.x@…`,
    which a mail server may well hold for someone else.
    """
    if not isinstance(address, str) or len(address) > MAX_ADDRESS_LENGTH:
        raise MatrixError(400, ErrorCode.INVALID_EMAIL, "The email address is not valid")
    if _ENCODED_WORD_RE.search(address):
        raise MatrixError(
            400, ErrorCode.INVALID_EMAIL, "The email address is not valid: it holds an encoded word (=?...?=)"
        )
    local_part = address.rpartition("@")[0]  # a domain never holds "@"; a quoted local part may
    if len(local_part.encode("utf-8", "surrogatepass")) > MAX_LOCAL_PART_OCTETS:
        raise MatrixError(
            400, ErrorCode.INVALID_EMAIL, "The email address is not valid: its local part is over 64 octets"
        )
    try:
        # Syntax only: no DNS, and special-use domains (.test, localhost) are fine for operators.
        validate_email(address, check_deliverability=False, globally_deliverable=False, test_environment=True)
    except EmailNotValidError:
        raise MatrixError(400, ErrorCode.INVALID_EMAIL, "The email address is not valid") from None
    return address


def stored_address(medium: str, address: str) -> str:
    """The form an address is stored and looked up in: email addresses case-folded. Nothing
    is checked (an address looked up as given; see `normalise_address` for one typed in)."""
    return address.casefold() if medium == "email" else address


def normalise_address(medium: str, address: str) -> str:
    """An address as a person types it, checked, in its stored form: an email address
    validated and case-folded, a phone number parsed (E.164 digits, with or without "+")."""
    if medium == "email":
        return normalise_email(address)
    if medium == "msisdn":
        return parse_phone_number("", address if address.startswith("+") else "+" + address).msisdn
    raise MatrixError(400, ErrorCode.UNRECOGNIZED, f"unknown medium {medium!r}")


def stored_addresses(medium: str, addresses: Sequence[str]) -> list[str]:
    """[stored_address(medium, a) for a in addresses], for a whole bulk_lookup at once."""
    return casefold_all(addresses) if medium == "email" else list(addresses)


def casefold_all(addresses: Sequence[str]) -> list[str]:
    """[a.casefold() for a in addresses], in one call: case folding is per character."""
    joined = "\n".join(addresses)
    if joined.isascii():
        # ASCII folds as lower() does, which has a fast path casefold() lacks (~6 us against
        # ~25 for a 1,000-address batch); a batch already folded keeps its own strings.
        folded = joined.lower()
        if folded == joined:
            return list(addresses)
    else:
        folded = joined.casefold()
    if joined.count("\n") != len(addresses) - 1:
        return [a.casefold() for a in addresses]
    return folded.split("\n") if addresses else []


@dataclass(frozen=True)
class UserId:
    localpart: str
    server_name: str


def parse_user_id(mxid: object) -> UserId | None:
    """The parts of a Matrix user ID, or None if `mxid` is not one (the whole string must be:
    no trailing newline)."""
    if not isinstance(mxid, str) or len(mxid.encode("utf-8", "surrogatepass")) > MAX_USER_ID_BYTES:
        return None
    match = _USER_ID_RE.fullmatch(mxid)
    return UserId(match[1], match[2]) if match else None


def is_valid_user_id(mxid: object) -> bool:
    return parse_user_id(mxid) is not None


def user_id_server(mxid: str) -> str:
    return mxid.split(":", 1)[1]


@dataclass(frozen=True)
class PhoneNumber:
    msisdn: str  # E.164 digits without "+": the stored form (appendix "3PID Types")
    intl_fmt: str
    region: str | None  # ISO 3166-1 alpha-2 of the number itself
    calling_code: int


def parse_phone_number(country: str, phone_number: str) -> PhoneNumber:
    """Parse a number as a person types it, in the context of `country`."""
    invalid = MatrixError(400, ErrorCode.INVALID_ADDRESS, "The phone number is not valid")
    if len(phone_number) > 64 or len(country) > 8:
        raise invalid
    try:
        number = phonenumbers.parse(phone_number, country.upper() or None)
    except phonenumbers.NumberParseException:
        raise invalid from None
    # "Possible", not "valid": numbers newer than the library's metadata must still work.
    if not phonenumbers.is_possible_number(number):
        raise invalid
    if number.country_code is None:  # never, for a possible number (for the type checker)
        raise invalid
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return PhoneNumber(
        msisdn=e164.lstrip("+"),
        intl_fmt=phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL),
        # A number outside the metadata's known ranges has no region of its own: take the
        # calling code's main one (44 -> GB), so refusing a country cannot be side-stepped.
        region=phonenumbers.region_code_for_number(number) or _main_region(number.country_code),
        calling_code=number.country_code,
    )


def _main_region(calling_code: int) -> str | None:
    region = phonenumbers.region_code_for_country_code(calling_code)
    return None if region == phonenumbers.UNKNOWN_REGION else region
