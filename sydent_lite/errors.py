"""The Matrix error every layer raises and the HTTP layer renders as `{errcode, error}`."""

from __future__ import annotations

from typing import Any


class MatrixError(Exception):
    """A standard Matrix error response (spec: "Standard error response")."""

    def __init__(self, status: int, errcode: str, error: str, **extra: Any) -> None:
        super().__init__(f"{status} {errcode}: {error}")
        self.status = status
        self.errcode = errcode
        self.error = error
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"errcode": self.errcode, "error": self.error, **self.extra}


def missing_params(*names: str) -> MatrixError:
    return MatrixError(400, "M_MISSING_PARAMS", "Missing parameters: " + ", ".join(names))


def invalid_param(message: str) -> MatrixError:
    return MatrixError(400, "M_INVALID_PARAM", message)


def no_valid_session() -> MatrixError:
    return MatrixError(404, "M_NO_VALID_SESSION", "No valid session was found matching that sid and client secret")


def session_expired() -> MatrixError:
    return MatrixError(400, "M_SESSION_EXPIRED", "This validation session has expired: request a new one")


def session_not_validated() -> MatrixError:
    return MatrixError(400, "M_SESSION_NOT_VALIDATED", "This validation session has not yet been completed")


def unauthorized(message: str = "Unrecognised access token") -> MatrixError:
    return MatrixError(401, "M_UNAUTHORIZED", message)
