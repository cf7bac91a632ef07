"""3PID and Matrix ID syntax: what counts as a valid address, and its stored form."""

from __future__ import annotations

import re

import email_validator
from email_validator import EmailNotValidError, validate_email

from sydent_lite.errors import MatrixError

MAX_ADDRESS_LENGTH = 512

# Operators run on internal domains (.local, localhost, .test): check syntax, not where the
# domain sits. Emptying this list is email-validator's documented way to allow them.
email_validator.SPECIAL_USE_DOMAIN_NAMES[:] = []

# Spec appendix "User Identifiers": @localpart:server_name, at most 255 bytes. Historical
# localparts may hold any printable ASCII but ':'; the server name is checked loosely here.
_USER_ID_RE = re.compile(r"^@[\x21-\x39\x3b-\x7e]+:[A-Za-z0-9.\-\[\]:]+$")


def normalise_email(address: object) -> str:
    """The stored form of an email address: case-folded, as given (appendix "3PID Types")."""
    if not isinstance(address, str) or len(address) > MAX_ADDRESS_LENGTH:
        raise MatrixError(400, "M_INVALID_EMAIL", "The email address is not valid")
    try:
        # Syntax only: no DNS, and special-use domains (.test, localhost) are fine for operators.
        validate_email(address, check_deliverability=False, globally_deliverable=False, test_environment=True)
    except EmailNotValidError:
        raise MatrixError(400, "M_INVALID_EMAIL", "The email address is not valid") from None
    return address.casefold()


def is_valid_user_id(mxid: object) -> bool:
    return isinstance(mxid, str) and len(mxid.encode("utf-8")) <= 255 and bool(_USER_ID_RE.match(mxid))


def user_id_server(mxid: str) -> str:
    return mxid.split(":", 1)[1]
