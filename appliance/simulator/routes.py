"""The HTTP surface: vLLM's routes, its --api-key scope, dev-mode sleep routes, 404/405 shapes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from appliance.simulator import VLLM_VERSION
from appliance.simulator.agents import AgentApis
from appliance.simulator.args import ServeArgs
from appliance.simulator.completions import Completions
from appliance.simulator.engine import Engine
from appliance.simulator.errors import DICT_MSG, ApiError, EngineDeadError, validation_error
from appliance.simulator.generation import token_ids, token_strs
from appliance.simulator.http import Request, Response, StreamResponse
from appliance.simulator.knobs import Knobs
from appliance.simulator.memory import MemoryPlan
from appliance.simulator.prompts import read_chat, reasoning_level

Result = Response | StreamResponse
Route = Callable[[Request], Awaitable[Result]]
# vLLM's --api-key middleware guards only these prefixes: 0.23.0's GUARDED_PREFIX in
# vllm/entrypoints/serve/utils/server_utils.py (later versions add "/cohere").
GUARDED_PREFIXES = ("/v1", "/v2", "/inference")
# vLLM serves /metrics as prometheus_client's CONTENT_TYPE_LATEST (0.23.0:
# vllm/entrypoints/serve/instrumentator/metrics.py); with the prometheus_client of 2026 images
# that is the 1.0.0 text format. Real vLLM 0.32 answers a plain GET with exactly this.
METRICS_TYPE = "text/plain; version=1.0.0; charset=utf-8"
# CORS as vLLM's app does it: Starlette's CORSMiddleware with --allowed-origins (0.23's default
# ["*"]), allowed methods and headers "*". The key check wraps it (vLLM adds the key middleware
# after CORS, so it runs first): a 401 carries no CORS header, and preflights (OPTIONS) pass the
# key check. A disallowed preflight is Starlette's 400 "Disallowed CORS origin".
CORS_METHODS = "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT"
PREFLIGHT_VARY = "Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class Api:
    def __init__(self, args: ServeArgs, knobs: Knobs, engine: Engine, memory: MemoryPlan) -> None:
        self.args = args
        self.knobs = knobs
        self.engine = engine
        self.memory = memory
        self.completions = Completions(args, knobs, engine, memory.max_model_len)
        self.agents = AgentApis(self.completions, args.limit_mm_per_prompt.get("image"))
        self.api_keys = set(args.api_keys) | ({knobs.env_api_key} if knobs.env_api_key else set())
        self.created = int(time.time())
        self.routes: dict[tuple[str, str], Route] = {
            ("GET", "/health"): self.health,
            ("GET", "/ping"): self.health,
            ("POST", "/ping"): self.health,
            ("GET", "/load"): self.load,
            ("GET", "/version"): self.version,
            ("GET", "/metrics"): self.metrics,
            ("GET", "/v1/models"): self.models,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/completions"): self.completion,
            # vLLM serves both for every generating model (0.32: vllm/entrypoints/generate/
            # api_router.py registers them beside chat); see agents.py.
            ("POST", "/v1/responses"): self.responses,
            ("POST", "/v1/messages"): self.messages,
            ("GET", "/openapi.json"): self.openapi,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("POST", "/invocations"): self.invocations,
        }
        if knobs.dev_mode:
            self.routes.update(
                {
                    ("POST", "/sleep"): self.sleep,
                    ("POST", "/wake_up"): self.wake_up,
                    ("GET", "/is_sleeping"): self.is_sleeping,
                    ("POST", "/reset_prefix_cache"): self.reset_prefix_cache,
                }
            )
        for path in knobs.without_routes:  # an older vLLM that lacks them
            for method in ("GET", "POST"):
                self.routes.pop((method, path), None)

    def route_names(self) -> list[tuple[str, str]]:
        return sorted({(path, method) for method, path in self.routes})

    async def handle(self, request: Request) -> Result:
        origin = request.headers.get("origin")
        if (
            origin is not None
            and request.method == "OPTIONS"
            and "access-control-request-method" in request.headers
        ):
            return self._preflight(request, origin)
        result = await self._guarded(request)
        if origin is not None and result.status != 401:
            result.headers.extend(self._cors_headers(origin))
        return result

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.args.allowed_origins or origin in self.args.allowed_origins

    def _cors_headers(self, origin: str) -> list[tuple[str, str]]:
        allow_all = "*" in self.args.allowed_origins
        headers: list[tuple[str, str]] = []
        if allow_all and not self.args.allow_credentials:
            headers.append(("access-control-allow-origin", "*"))
        elif self._origin_allowed(origin):
            headers.append(("access-control-allow-origin", origin))
        if self.args.allow_credentials:
            headers.append(("access-control-allow-credentials", "true"))
        headers.append(("vary", "Origin"))
        return headers

    def _preflight(self, request: Request, origin: str) -> Response:
        headers = [("vary", PREFLIGHT_VARY)]
        allowed = self._origin_allowed(origin)
        if allowed:
            explicit = "*" not in self.args.allowed_origins or self.args.allow_credentials
            headers.append(("access-control-allow-origin", origin if explicit else "*"))
        headers += [
            ("access-control-allow-methods", CORS_METHODS),
            ("access-control-max-age", "600"),
        ]
        requested = request.headers.get("access-control-request-headers")
        if requested is not None:
            headers.append(("access-control-allow-headers", requested))
        if self.args.allow_credentials:
            headers.append(("access-control-allow-credentials", "true"))
        if not allowed:
            body = b"Disallowed CORS origin"
            return Response(400, body, "text/plain; charset=utf-8", headers)
        return Response(200, b"OK", "text/plain; charset=utf-8", headers)

    async def _guarded(self, request: Request) -> Result:
        if (
            self.api_keys
            and request.method != "OPTIONS"
            and request.path.startswith(GUARDED_PREFIXES)
        ):
            auth = request.headers.get("authorization", "")
            if auth not in {f"Bearer {key}" for key in self.api_keys}:
                return Response.json({"error": "Unauthorized"}, 401)
        route = self.routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self.routes):
                return Response.json({"detail": "Method Not Allowed"}, 405)
            return Response.json({"detail": "Not Found"}, 404)
        try:
            return await route(request)
        except ApiError as err:
            return Response.json(err.body(request.path), err.status)

    # ----------------------------------------------------------------------------- plain routes

    async def health(self, request: Request) -> Result:
        del request
        return Response(503 if self.engine.dead else 200, b"", None)

    async def load(self, request: Request) -> Result:
        del request
        return Response.json({"server_load": len(self.engine.running) + self.engine.waiting})

    async def version(self, request: Request) -> Result:
        del request
        return Response.json({"version": VLLM_VERSION})

    async def metrics(self, request: Request) -> Result:
        del request
        return Response(200, self.engine.metrics.render().encode(), METRICS_TYPE)

    async def openapi(self, request: Request) -> Result:
        """FastAPI's schema, reduced to what a client reads from it: which paths exist."""
        del request
        paths: dict[str, dict[str, Any]] = {}
        for method, path in self.routes:
            paths.setdefault(path, {})[method.lower()] = {}
        info = {"title": "FastAPI", "version": "0.1.0"}
        return Response.json({"openapi": "3.1.0", "info": info, "paths": paths})

    async def models(self, request: Request) -> Result:
        del request
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "vllm",
                "root": self.args.model,
                "parent": None,
                "max_model_len": self.memory.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{uuid.uuid4().hex}",
                        "object": "model_permission",
                        "created": self.created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in self.args.served_model_names
        ]
        return Response.json({"object": "list", "data": data})

    # ----------------------------------------------------------------------------- inference

    async def chat(self, request: Request) -> Result:
        self._alive()
        return await self.completions.chat(_body(request))

    async def completion(self, request: Request) -> Result:
        self._alive()
        return await self.completions.completion(_body(request))

    async def responses(self, request: Request) -> Result:
        self._alive()
        return await self.agents.responses(_body(request))

    async def messages(self, request: Request) -> Result:
        self._alive()
        return await self.agents.messages(_body(request))

    async def invocations(self, request: Request) -> Result:
        body = _body(request)
        if isinstance(body, dict) and "messages" in body:
            return await self.chat(request)
        return await self.completion(request)

    async def tokenize(self, request: Request) -> Result:
        body = _body(request)
        if not isinstance(body, dict):
            raise validation_error("body", DICT_MSG, body, "dict_type")
        self.completions.model_name(body)
        if "messages" in body:
            prompt = read_chat(body, reasoning_level(body), None)
            text = prompt.text_without_images
            images = [image.tokens for image in prompt.images]
        else:
            text = str(body.get("prompt", ""))
            images = []
        ids = token_ids(text) + [0] * sum(images)
        strs = token_strs(text) + ["<im_patch>"] * sum(images)
        return Response.json(
            {
                "count": len(ids),
                "max_model_len": self.memory.max_model_len,
                "tokens": ids,
                "token_strs": strs if body.get("return_token_strs") else None,
            }
        )

    async def detokenize(self, request: Request) -> Result:
        body = _body(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list):
            raise validation_error("tokens", "Field required", body, "missing")
        return Response.json({"prompt": " ".join(f"<{int(t)}>" for t in tokens)})

    def _alive(self) -> None:
        if self.engine.dead:
            raise EngineDeadError()

    # ----------------------------------------------------------------------------- dev mode

    async def sleep(self, request: Request) -> Result:
        self._sleep_enabled()
        try:
            level = int(request.query.get("level", "1"))
        except ValueError:
            raise ApiError(400, "level must be an integer") from None
        if level not in (1, 2):
            raise ApiError(400, f"Invalid sleep level {level}; expected 1 or 2")
        await self.engine.sleep(level)
        if not _sleep_answers_json():
            return Response(200, b"", None)
        return Response.json({"status": "sleeping", "level": level})

    async def wake_up(self, request: Request) -> Result:
        self._sleep_enabled()
        tags = [t for t in request.query.get("tags", "").split(",") if t] or None
        await self.engine.wake_up(tags)
        if not _sleep_answers_json():
            return Response(200, b"", None)
        return Response.json({"status": "awake", "tags": tags})

    async def is_sleeping(self, request: Request) -> Result:
        del request
        return Response.json({"is_sleeping": self.engine.sleep_level > 0})

    async def reset_prefix_cache(self, request: Request) -> Result:
        del request
        return Response(200, b"", None)

    def _sleep_enabled(self) -> None:
        if not self.args.enable_sleep_mode:
            raise ApiError(
                500,
                "Sleep mode is not enabled. Start the server with --enable-sleep-mode.",
                type_="InternalServerError",
            )


def _sleep_answers_json() -> bool:
    """vLLM 0.32 answers `/sleep` with `{"status": "sleeping", "level": N}` and `/wake_up` with
    `{"status": "awake", "tags": [...] | null}` (`vllm/entrypoints/serve/dev/sleep/api_router.py`);
    older releases, the 0.2x nightlies among them, an empty 200 (`Response(status_code=200)`).
    The simulator answers as the version it imitates."""
    parts = VLLM_VERSION.split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (0, 32)
    except (ValueError, IndexError):
        return True


def _body(request: Request) -> Any:
    try:
        return request.json()
    except (ValueError, UnicodeDecodeError) as err:
        detail = {"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error",
                  "input": {}, "ctx": {"error": str(err)}}  # fmt: skip
        raise ApiError(400, str([detail]), type_="Bad Request", details=[detail]) from None
