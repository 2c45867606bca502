"""The routes the gateway forwards and the two API shapes they speak: OpenAI's and Anthropic's.

Five routes, compared byte for byte with the raw request target: `GET /v1/models`,
`POST /v1/chat/completions`, `POST /v1/completions`, and for coding agents `POST /v1/responses`
(OpenAI's Responses API: Codex, newer openai clients) and `POST /v1/messages` (Anthropic's
Messages API: Claude Code, the anthropic SDKs).

What vLLM 0.32 serves, from its source (`vllm/entrypoints/...`):

- both agent routes are registered for every generating model:
  `generate/api_router.py:28-44` attaches `openai/responses/api_router.py:48` (`/v1/responses`)
  and `anthropic/api_router.py:51` (`/v1/messages`); `generate/api_router.py:104-126,171-194`
  builds their handlers when "generate" is a supported task. Both run vLLM's chat template,
  reasoning parser and tool parser (`--enable-auto-tool-choice --tool-call-parser`).
- Responses: a JSON `ResponsesResponse` whose `usage` is `{input_tokens, output_tokens,
  total_tokens, ...}`, or with `stream` server-sent events `event: <type>\\ndata: {...}`
  (`openai/responses/api_router.py:33-45`) from `response.created` to `response.completed`,
  whose `response.usage` has the counts (`openai/responses/serving.py:1368-1425`). No `[DONE]`.
- Messages: vLLM turns the request into a chat completion and back
  (`anthropic/serving.py:793-823`); `usage` is `{input_tokens, output_tokens}` with any cached
  prompt tokens apart in `cache_read_input_tokens` (`anthropic/serving.py:63-99`). A stream
  always asks its chat stream for usage (`anthropic/serving.py:673-685`): `message_start` carries
  the input tokens, `message_delta` the final counts, `message_stop` ends it
  (`anthropic/serving.py:997-1061`). Its errors are `{"type": "error", "error": {"type",
  "message"}}` (`anthropic/api_router.py:38-47`).

So the Anthropic route gets its errors from the gateway in Anthropic's shape too: its SDK reads
`error.message` from there, and raises `AuthenticationError` on a 401 whatever the body says.

An engine without one of the agent routes (an older vLLM image) answers FastAPI's 404
`{"detail": "Not Found"}`; the gateway asks the engine which paths it serves (its
`/openapi.json`) before forwarding the first such request and says 501 in the API's own shape
instead of passing on a 404 that reads like a wrong base URL.
"""

from __future__ import annotations

import json
from typing import Any

MODELS = "/v1/models"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
ROUTES: dict[tuple[str, bytes], str] = {
    ("GET", MODELS.encode()): MODELS,
    ("POST", CHAT.encode()): CHAT,
    ("POST", COMPLETIONS.encode()): COMPLETIONS,
    ("POST", RESPONSES.encode()): RESPONSES,
    ("POST", MESSAGES.encode()): MESSAGES,
}
# Routes an engine may lack (older vLLM): checked against the engine's own list before forwarding.
AGENT_ROUTES = (RESPONSES, MESSAGES)
ALLOWED_TEXT = (
    "GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /v1/responses and "
    "POST /v1/messages"
)
OPENAPI_PATH = "/openapi.json"

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
}
# Anthropic's documented error types (https://docs.anthropic.com/en/api/errors).
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, code: str, message: str, *, route: str = "", **extra: Any) -> bytes:
    """The gateway's error in the shape of the route's API.

    OpenAI: `{"error": {"message", "type", "param", "code"}}`; Anthropic (`/v1/messages`):
    `{"type": "error", "error": {"type", "message"}}` plus the gateway's `code` and extras."""
    if route == MESSAGES:
        error: dict[str, Any] = {
            "type": _ANTHROPIC_TYPES.get(status, "api_error"),
            "message": message,
            "code": code,
        }
        error.update(extra)
        return json.dumps({"type": "error", "error": error}).encode()
    error = {
        "message": message,
        "type": _OPENAI_TYPES.get(status, "server_error"),
        "param": None,
        "code": code,
    }
    error.update(extra)
    return json.dumps({"error": error}).encode()


def engine_paths(openapi: bytes) -> frozenset[str] | None:
    """The paths an engine's `/openapi.json` lists, or None when it is not such a document."""
    try:
        document = json.loads(openapi)
    except ValueError:
        return None
    paths = document.get("paths") if isinstance(document, dict) else None
    if not isinstance(paths, dict):
        return None
    return frozenset(str(path) for path in paths)


def is_unknown_route(status: int, body: bytes) -> bool:
    """Is this the engine's (FastAPI's) answer to a path it has no route for?"""
    if status != 404:
        return False
    try:
        value = json.loads(body)
    except ValueError:
        return False
    return isinstance(value, dict) and value.get("detail") == "Not Found"


def not_served_message(route: str) -> str:
    name = "Anthropic Messages API" if route == MESSAGES else "OpenAI Responses API"
    return (
        f"The engine behind this endpoint does not serve POST {route} (the {name}): its vLLM "
        "is older than that API. The owner can update the engine image; meanwhile use "
        "POST /v1/chat/completions."
    )
