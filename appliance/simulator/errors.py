"""vLLM-shaped HTTP errors: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

PHRASES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """An error answered as vLLM answers it."""

    def __init__(
        self, status: int, message: str, *, type_: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or PHRASES.get(status, "BadRequestError")
        self.param = param

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.status,
            }
        }


class EngineDeadError(ApiError):
    """The engine core died; vLLM answers 500 and /health turns 503."""

    def __init__(self) -> None:
        super().__init__(
            500,
            "EngineCore encountered an issue. See stack trace (above) for the root cause.",
            type_="InternalServerError",
        )


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


DICT_MSG = "Input should be a valid dictionary"


def validation_error(
    field: str, msg: str, value: Any, kind: str, ctx: dict[str, str] | None = None
) -> ApiError:
    """FastAPI's RequestValidationError as vLLM's handler words it (400, type "Bad Request")."""
    detail: dict[str, Any] = {"type": kind, "loc": ("body", field), "msg": msg, "input": value}
    if ctx:
        detail["ctx"] = ctx
    return ApiError(400, str([detail]), type_="Bad Request", param=None)
