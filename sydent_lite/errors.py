"""The Matrix error every layer raises and the HTTP layer renders as `{errcode, error}`."""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.StrEnum):
    """Every `errcode` this server sends (spec: "Standard error response" and the identity
    service API). A StrEnum member is a `str`: it serialises as the bare string in JSON and in
    f-strings, so answers stay byte for byte what they were when these were literals."""

    BAD_JSON = "M_BAD_JSON"
    DESTINATION_REJECTED = "M_DESTINATION_REJECTED"
    EMAIL_SEND_ERROR = "M_EMAIL_SEND_ERROR"
    FORBIDDEN = "M_FORBIDDEN"
    INVALID_ADDRESS = "M_INVALID_ADDRESS"
    INVALID_EMAIL = "M_INVALID_EMAIL"
    INVALID_PARAM = "M_INVALID_PARAM"
    INVALID_PEPPER = "M_INVALID_PEPPER"
    LIMIT_EXCEEDED = "M_LIMIT_EXCEEDED"
    MISSING_PARAMS = "M_MISSING_PARAMS"
    NO_VALID_SESSION = "M_NO_VALID_SESSION"
    NOT_FOUND = "M_NOT_FOUND"
    NOT_JSON = "M_NOT_JSON"
    SEND_ERROR = "M_SEND_ERROR"
    SESSION_EXPIRED = "M_SESSION_EXPIRED"
    SESSION_NOT_VALIDATED = "M_SESSION_NOT_VALIDATED"
    TERMS_NOT_SIGNED = "M_TERMS_NOT_SIGNED"
    THREEPID_IN_USE = "M_THREEPID_IN_USE"
    TOKEN_INCORRECT = "M_TOKEN_INCORRECT"
    TOO_LARGE = "M_TOO_LARGE"
    UNAUTHORIZED = "M_UNAUTHORIZED"
    UNKNOWN = "M_UNKNOWN"
    UNKNOWN_TOKEN = "M_UNKNOWN_TOKEN"
    UNRECOGNIZED = "M_UNRECOGNIZED"


class MatrixError(Exception):
    """A standard Matrix error response (spec: "Standard error response")."""

    def __init__(self, status: int, errcode: ErrorCode, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.error, **self.extra}


def missing_params(*names: str) -> MatrixError:
    return MatrixError(400, ErrorCode.MISSING_PARAMS, "Missing parameters: " + ", ".join(names))


def invalid_param(message: str) -> MatrixError:
    return MatrixError(400, ErrorCode.INVALID_PARAM, message)


def no_valid_session() -> MatrixError:
    return MatrixError(
        404, ErrorCode.NO_VALID_SESSION, "No valid session was found matching that sid and client secret"
    )


def session_expired() -> MatrixError:
    return MatrixError(400, ErrorCode.SESSION_EXPIRED, "This validation session has expired: request a new one")


def session_not_validated() -> MatrixError:
    return MatrixError(400, ErrorCode.SESSION_NOT_VALIDATED, "This validation session has not yet been completed")


def unauthorized(message: str = "Unrecognised access token") -> MatrixError:
    return MatrixError(401, ErrorCode.UNAUTHORIZED, message)
