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
        self,
        status: int,
        message: str,
        *,
        type_: str | None = None,
        param: str | None = None,
        details: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or PHRASES.get(status, "BadRequestError")
        self.param = param
        self.details = details  # pydantic's errors, for a request validation error

    def body(self, path: str | None = None) -> dict[str, Any]:
        message = self.message
        if self.details is not None:
            message = validation_message(self.details, path)
        return {
            "error": {
                "message": message,
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


# Where FastAPI says the endpoint is, in vLLM 0.23.0 as installed in the vllm-openai image.
_SITE = "/usr/local/lib/python3.12/dist-packages/vllm/entrypoints"
ENDPOINTS = {
    "/v1/chat/completions": ("openai/chat_completion/api_router.py", 53, "create_chat_completion"),
    "/v1/completions": ("openai/completion/api_router.py", 46, "create_completion"),
    "/tokenize": ("serve/tokenize/api_router.py", 49, "tokenize"),
    "/detokenize": ("serve/tokenize/api_router.py", 74, "detokenize"),
}


def validation_error(
    field: str | tuple[str | int, ...],
    msg: str,
    value: Any,
    kind: str,
    ctx: dict[str, str] | None = None,
) -> ApiError:
    """FastAPI's RequestValidationError as vLLM 0.23.0's handler answers it: 400, type "Bad
    Request", `param` null (0.23 sets it only for its own VLLMValidationError; 0.32 fills it from
    the error's loc, e.g. "body.temperature")."""
    loc = ("body", *field) if isinstance(field, tuple) else ("body", field)
    detail: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx:
        detail["ctx"] = ctx
    return ApiError(400, str([detail]), type_="Bad Request", param=None, details=[detail])


def validation_message(details: list[dict[str, Any]], path: str | None) -> str:
    """vLLM 0.23.0's validation_exception_handler (vllm/entrypoints/serve/utils/server_utils.py):
    `f"{str(exc)} {str(exc.errors())}"`, where FastAPI's str(exc) is "N validation error(s):"
    with one line per error and the endpoint's source location. (0.32 drops the location and
    the repeated list: vllm/entrypoints/serve/exception_handling/handlers/validation.py.)"""
    count = len(details)
    text = f"{count} validation error{'s' if count != 1 else ''}:\n"
    text += "".join(f"  {detail}\n" for detail in details)
    if path in ENDPOINTS:
        file, line, function = ENDPOINTS[path]
        text += f'  File "{_SITE}/{file}", line {line}, in {function}\n    POST {path}'
    return f"{text.rstrip()} {details}"
