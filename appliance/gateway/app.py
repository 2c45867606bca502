"""The gateway's ASGI application: an allowlisting, key-checking proxy in front of the engine.

Raw ASGI rather than a framework, because the two things that matter are exact: which request
reaches the engine (the raw request target is compared byte for byte with five allowed routes, so
no decoding, dot-segment or slash trick can name another engine route), and how bytes flow back
(each server-sent event is sent on the moment it is complete; a client that goes away cancels the
engine request by closing the upstream connection).

Order of checks: address locked out (429) -> route (404) -> key (401) -> body size (413) -> JSON
(400) -> what the body asks of the engine (400: `limits.check_body`: media only as data URLs, no
engine-side templates/tensors/extension fields, caps on n, tokens, logprobs...) -> engine ready
(503) -> the engine serves an agent route (501) -> model name (404) -> per-key limits (429) ->
forward. A refused body never wakes or reaches the engine.

The agent routes (`/v1/responses`, `/v1/messages`; see `apis.py`) go the same way, with two
differences: `/v1/messages` answers errors in Anthropic's shape and its clients send the key as
`x-api-key` (accepted on every route, beside `Authorization: Bearer`); and their streams always
carry usage, so the gateway asks for nothing and hides nothing there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
import httpx
from prometheus_client.parser import text_string_to_metric_families

from appliance import endpoint
from appliance.engine.state import EngineState
from appliance.gateway import apis
from appliance.gateway.access import AccessLog, AccessRecord, printable_path
from appliance.gateway.apis import (
    AGENT_ROUTES,
    ALLOWED_TEXT,
    CHAT,
    COMPLETIONS,
    MODELS,
    OPENAPI_PATH,
    ROUTES,
)
from appliance.gateway.engine_gate import EngineCheck, EngineGate
from appliance.gateway.limits import BodyCaps, FailureThrottle, KeyLimiter, check_body
from appliance.gateway.sse import Usage, UsageTap, usage_of_body
from appliance.gateway.upstream import (
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    request_head,
)
from appliance.keys import ApiKey, KeyStore, KeyStoreError
from appliance.units import fmt_bytes

if TYPE_CHECKING:
    from appliance.fleet.router import Fleet

log = logging.getLogger("step_station.gateway")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

BODY_READ_TIMEOUT_S = 120.0
PROBE_TIMEOUT_S = 10.0
_MAX_PROBE = 4 << 20  # an /openapi.json larger than this is not read: the route is tried instead
_MAX_404 = 64 << 10  # an engine 404 on an agent route is read whole to tell "no such route"
_MAX_USAGE_SCAN = 8 << 20  # non-streamed responses larger than this are passed on, not parsed
_VIA = (b"via", b"1.1 step-station")
FLEET_LOAD = b"/fleet/load"  # a member's load, for its front (fleet key only)
_LOAD_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_pct",
}
_LOAD_NAMES = tuple(f"{name}{{" for name in _LOAD_GAUGES) + tuple(f"{n} " for n in _LOAD_GAUGES)
_LOAD_COMMENTS = tuple(f"# {kind} {name} " for kind in ("HELP", "TYPE") for name in _LOAD_GAUGES)


def engine_load(check: EngineCheck) -> dict[str, object]:
    """The own engine's load for a fleet's front: state, running, waiting, KV-cache use (%)."""
    load: dict[str, object] = {"state": check.state.value}
    if not check.ready:
        return load
    try:
        response = endpoint.request("GET", f"{check.url}/metrics", 2.0)
        response.raise_for_status()
        # vLLM's gauges, one sample per engine (summed) or per model; the gateway stands apart
        # from appliance/monitoring, so it reads the three it needs with prometheus_client. Only
        # their lines are parsed: vLLM exports hundreds (every latency histogram), and a front
        # asks every 2 s.
        lines = (
            line
            for line in response.text.splitlines()
            if line.startswith(_LOAD_NAMES) or line.startswith(_LOAD_COMMENTS)
        )
        found: dict[str, list[float]] = {}
        for family in text_string_to_metric_families("\n".join(lines) + "\n"):
            if family.name in _LOAD_GAUGES:
                found[family.name] = [s.value for s in family.samples]
    except (httpx.HTTPError, ValueError) as err:
        load["error"] = f"the engine's /metrics: {err}"
        return load
    for name, key in _LOAD_GAUGES.items():
        values = found.get(name)
        if values and key == "kv_cache_pct":
            load[key] = round(100.0 * sum(values) / len(values), 1)
        elif values:
            load[key] = int(sum(values))
    return load


_PASS_HEADERS = {b"content-type", b"content-length", b"x-request-id"}


@dataclass(frozen=True)
class GatewayConfig:
    """What the app needs from the settings; replaced as a whole when settings change."""

    require_key: bool = False
    max_body_bytes: int = 64 << 20
    per_key_concurrency: int = 32
    per_key_requests_per_minute: int = 600
    engine_api_key: str = ""
    caps: BodyCaps = field(default_factory=BodyCaps)


class _Reply(Exception):  # noqa: N818 - control flow: an error response to send
    def __init__(
        self, status: int, code: str, message: str, *, retry_after: int = 0, **extra: Any
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.extra = extra


@dataclass
class _Exchange:
    """What one request did, for the access log and the usage counts."""

    started: float
    address: str
    method: str
    raw_path: bytes
    route: str = ""  # one of ROUTES' values once the target matched one
    status: int = 0
    key: ApiKey | None = None
    stream: bool = False
    usage: Usage | None = None
    notes: list[str] = field(default_factory=list)
    response_started: bool = False
    response_done: bool = False
    accounted: bool = False
    fleet_peer: bool = False  # carried the fleet key: a front's router, served by the own engine


class GatewayApp:
    """`GatewayApp(...)` is an ASGI callable; `config` may be replaced at any time."""

    def __init__(
        self,
        *,
        keys: KeyStore,
        gate: EngineGate,
        config: GatewayConfig,
        access: AccessLog | None = None,
        throttle: FailureThrottle | None = None,
    ) -> None:
        self.keys = keys
        self.gate = gate
        self.access = access or AccessLog()
        self.throttle = throttle or FailureThrottle()
        self.limiter = KeyLimiter(config.per_key_concurrency, config.per_key_requests_per_minute)
        self._config = config
        self._pools: dict[tuple[str, int], UpstreamPool] = {}
        # Per engine (URL, per-start key): the paths its /openapi.json lists; None: unknown.
        self._engine_paths: dict[tuple[str, str], frozenset[str] | None] = {}
        # Set by the service: the fleet (appliance/fleet) this Station fronts or belongs to.
        self.fleet: Fleet | None = None

    # ---------------------------------------------------------------------------- settings

    @property
    def config(self) -> GatewayConfig:
        return self._config

    @config.setter
    def config(self, value: GatewayConfig) -> None:
        self._config = value
        self.limiter.configure(value.per_key_concurrency, value.per_key_requests_per_minute)

    def sweep_idle(self) -> None:
        """Close engine connections nobody reused for a while."""
        for pool in self._pools.values():
            pool.sweep()

    async def aclose(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    # ------------------------------------------------------------------------------- ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # websockets: nothing here accepts them; the server closes the connection
        client = scope.get("client")
        ex = _Exchange(
            started=time.perf_counter(),
            address=str(client[0]) if client else "?",
            method=str(scope.get("method", "?")),
            raw_path=bytes(scope.get("raw_path") or scope.get("path", "").encode()),
        )
        try:
            await self._handle(scope, receive, send, ex)
        except _Reply as reply:
            await self._send_error(send, ex, reply)
        except Exception:
            log.exception("gateway error on %s %s", ex.method, printable_path(ex.raw_path))
            await self._send_error(
                send,
                ex,
                _Reply(500, "gateway_error", "The gateway failed on this request; see its log."),
            )
        finally:
            self._finish(ex)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, ex: _Exchange) -> None:
        cfg = self._config
        refusal = self.throttle.check(ex.address)
        if refusal is not None:
            raise _Reply(429, refusal.code, refusal.message, retry_after=refusal.retry_after_s)
        route = ROUTES.get((ex.method, ex.raw_path))
        in_fleet = self.fleet is not None and self.fleet.active()
        if route is None and (ex.method, ex.raw_path) == ("GET", b"/health") and in_fleet:
            await self._fleet_health(send, ex)
            return
        if route is None and (ex.method, ex.raw_path) == ("GET", FLEET_LOAD) and in_fleet:
            await self._fleet_load(scope, send, ex)
            return
        if route is None:
            raise _Reply(
                404,
                "not_found",
                f"Not found: this endpoint serves only {ALLOWED_TEXT}.",
            )
        ex.route = route
        ex.key = self._authenticate(scope, ex, cfg)
        body = await _read_body(scope, receive, cfg.max_body_bytes)
        payload = _parse_json(body) if route != MODELS else None
        if payload is not None:
            refused = check_body(route, payload, cfg.caps)
            if refused is not None:
                raise _Reply(400, refused.code, refused.message, param=refused.param)
        check = await self.gate.check()
        if not check.ready:
            raise _Reply(
                503,
                "engine_not_ready",
                check.message,
                retry_after=check.retry_after_s,
                engine_state=check.state.value,
            )
        if route in AGENT_ROUTES and not await self._engine_serves(route, check):
            raise _Reply(501, "route_not_served_by_engine", apis.not_served_message(route))
        self.gate.note_activity()
        upstream_body = b""
        strip_usage = False
        if payload is not None:
            upstream_body, ex.stream, strip_usage = _prepare(payload, body, check, route)
        principal = ex.key.id if ex.key is not None else f"addr:{ex.address}"
        refusal = self.limiter.acquire(principal)
        if refusal is not None:
            raise _Reply(429, refusal.code, refusal.message, retry_after=refusal.retry_after_s)
        try:
            await self._proxy(route, upstream_body, strip_usage, check, receive, send, ex)
        finally:
            self.limiter.release(principal)
            # the idle-sleep clock counts from the end of the last answer, not its start: a
            # stream longer than the idle time must not leave the engine "idle" when it ends
            self.gate.note_activity()

    def _authenticate(self, scope: Scope, ex: _Exchange, cfg: GatewayConfig) -> ApiKey | None:
        # Bearer as OpenAI clients send it, `x-api-key` as Anthropic's do (Claude Code sends
        # either, by which variable holds the key). Two different keys are refused: were the
        # first valid one taken, a guess beside one's own key would never count as a failure.
        tokens = list(dict.fromkeys(t for t in (_bearer(scope), _x_api_key(scope)) if t))
        if len(tokens) > 1 and cfg.require_key:
            self.throttle.failed(ex.address)
            raise _Reply(
                401,
                "conflicting_api_keys",
                "The request carries two different API keys (in `Authorization` and "
                "`x-api-key`). Send one key, in either header.",
            )
        token = tokens[0] if tokens else ""
        if self.fleet is not None and len(tokens) == 1 and self.fleet.accepts(token):
            ex.fleet_peer = True  # a front's router: served here, never routed on
            self.throttle.succeeded(ex.address)
            return None
        try:
            key = next(filter(None, (self.keys.verify(t) for t in tokens)), None)
        except KeyStoreError as err:
            if not cfg.require_key:
                return None
            raise _Reply(500, "key_store_unreadable", str(err)) from err
        if not cfg.require_key:
            return key
        if key is None:
            self.throttle.failed(ex.address)
            if not token:
                raise _Reply(
                    401,
                    "missing_api_key",
                    "This endpoint needs an API key: send `Authorization: Bearer sk-step-…` "
                    "(or `x-api-key: sk-step-…`, as Anthropic clients do). "
                    "The owner creates keys in Step Station's Sharing tab or with "
                    "`step-station keys create NAME`.",
                )
            raise _Reply(
                401,
                "invalid_api_key",
                "The API key is wrong or was revoked. Ask the owner for a valid key.",
            )
        self.throttle.succeeded(ex.address)
        return key

    # ------------------------------------------------------------------------------ proxy

    def _pool(self, check: EngineCheck) -> tuple[UpstreamPool, str, str]:
        """(the pool for this engine, the path prefix, the Host header) for `check.url`."""
        uds, http_url = endpoint.split(check.url)  # the engine's socket, or None on TCP
        target = urlsplit(http_url)
        host, port = target.hostname or "127.0.0.1", target.port or 80
        where = (uds or host, port)
        pool = self._pools.get(where)
        if pool is None:
            pool = self._pools[where] = UpstreamPool(host, port, uds=uds)
        return pool, target.path.rstrip("/"), host if uds else f"{host}:{port}"

    def _engine_headers(self) -> list[tuple[str, str]]:
        headers = [("Accept-Encoding", "identity")]
        if self._config.engine_api_key:
            headers.append(("Authorization", f"Bearer {self._config.engine_api_key}"))
        return headers

    async def _engine_serves(self, route: str, check: EngineCheck) -> bool:
        """False only when the engine's own route list lacks `route`; asked once per engine
        start (its URL and per-start key), and "don't know" forwards the request."""
        where = (check.url, self._config.engine_api_key)
        if where not in self._engine_paths:
            self._engine_paths[where] = await self._probe_paths(check)
            while len(self._engine_paths) > 16:  # engines come and go: keep the recent ones
                del self._engine_paths[next(iter(self._engine_paths))]
        paths = self._engine_paths[where]
        return paths is None or route in paths

    async def _probe_paths(self, check: EngineCheck) -> frozenset[str] | None:
        pool, prefix, host = self._pool(check)
        head = request_head("GET", prefix + OPENAPI_PATH, host, self._engine_headers())
        response: UpstreamResponse | None = None
        try:
            with anyio.fail_after(PROBE_TIMEOUT_S):
                response = await pool.request(head, b"")
                body = await _read_all(response, _MAX_PROBE)
        except (UpstreamError, TimeoutError) as err:
            log.info("gateway: the engine's route list is unknown (%s)", err)
            return None
        finally:
            if response is not None:
                if response.complete:
                    response.release()
                else:
                    response.abort()
        if response.status != 200 or body is None:
            return None
        return apis.engine_paths(body)

    async def _proxy(
        self,
        route: str,
        body: bytes,
        strip_usage: bool,
        check: EngineCheck,
        receive: Receive,
        send: Send,
        ex: _Exchange,
    ) -> None:
        via = self.fleet.route() if self.fleet is not None and not ex.fleet_peer else None
        if via is not None:  # through vLLM's router, with the fleet key (docs/fleet.md)
            check = dataclasses.replace(check, url=via[0])
        pool, prefix, host = self._pool(check)
        headers = self._engine_headers()
        if via is not None:
            headers = [("Accept-Encoding", "identity"), ("Authorization", f"Bearer {via[1]}")]
            ex.notes.append("fleet")
        if route != MODELS:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        head = request_head("GET" if route == MODELS else "POST", prefix + route, host, headers)
        # A reply raised inside the task group would leave it wrapped in an ExceptionGroup (and
        # be answered as a 500): it is kept and raised again outside.
        reply: _Reply | None = None
        async with anyio.create_task_group() as group:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if not ex.response_done:
                            ex.notes.append("client disconnected")
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch_disconnect)
            try:
                await self._exchange(pool, head, body, strip_usage, send, ex)
            except _Reply as err:
                reply = err
            finally:
                group.cancel_scope.cancel()
        if reply is not None:
            raise reply

    async def _exchange(
        self,
        pool: UpstreamPool,
        head: bytes,
        body: bytes,
        strip_usage: bool,
        send: Send,
        ex: _Exchange,
    ) -> None:
        try:
            response = await pool.request(head, body)
        except UpstreamError as err:
            self.gate.invalidate()
            raise _Reply(
                503,
                "engine_unreachable",
                "The engine did not answer; it may be restarting. Try again shortly.",
                retry_after=5,
            ) from err
        try:
            if response.status == 404 and ex.route in AGENT_ROUTES:
                await self._relay_404(response, send, ex)
            else:
                await self._relay(response, strip_usage, send, ex)
        finally:
            if response.complete:
                response.release()
            else:
                response.abort()  # the client left (or the engine broke): end it in the engine

    async def _fleet_health(self, send: Send, ex: _Exchange) -> None:
        """`GET /health` for a fleet's router (only on a Station in a fleet): 200 while the own
        engine is ready, else 503; no body, no key (the router's health checks send none)."""
        status = await anyio.to_thread.run_sync(self.gate.engine.status)
        ex.status = 200 if status.state is EngineState.READY else 503
        ex.response_started = True
        await send({"type": "http.response.start", "status": ex.status, "headers": [_VIA]})
        await send({"type": "http.response.body", "body": b""})
        ex.response_done = True

    async def _fleet_load(self, scope: Scope, send: Send, ex: _Exchange) -> None:
        """`GET /fleet/load` for the front (fleet key only): the own engine's state, requests
        running and waiting, and KV-cache use, read from its `/metrics`, as JSON."""
        tokens = [t for t in (_bearer(scope), _x_api_key(scope)) if t]
        if len(tokens) != 1 or self.fleet is None or not self.fleet.accepts(tokens[0]):
            self.throttle.failed(ex.address)
            raise _Reply(401, "invalid_fleet_key", "This route answers only the fleet's front.")
        self.throttle.succeeded(ex.address)
        check = await self.gate.check()
        load = await anyio.to_thread.run_sync(engine_load, check)
        body = json.dumps(load).encode()
        ex.status = 200
        ex.response_started = True
        headers = [(b"content-type", b"application/json"), _VIA]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        ex.response_done = True

    async def _relay_404(self, response: UpstreamResponse, send: Send, ex: _Exchange) -> None:
        """An agent route the engine turned down with 404: "no such route" (its route list
        could not be read) is the gateway's 501; any other 404 (a model name) is passed on."""
        body = await _read_all(response, _MAX_404)
        if body is None or apis.is_unknown_route(response.status, body):
            raise _Reply(501, "route_not_served_by_engine", apis.not_served_message(ex.route))
        ex.status = response.status
        headers = [(b"content-type", response.header(b"content-type") or b"application/json")]
        headers += [(b"content-length", str(len(body)).encode()), _VIA]
        await send({"type": "http.response.start", "status": ex.status, "headers": headers})
        ex.response_started = ex.response_done = True
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _relay(
        self, response: UpstreamResponse, strip_usage: bool, send: Send, ex: _Exchange
    ) -> None:
        sse = response.header(b"content-type").startswith(b"text/event-stream")
        headers = [
            (name, value)
            for name, value in response.headers
            if name in _PASS_HEADERS and not (sse and name == b"content-length")
        ]
        headers.append(_VIA)
        if sse:
            headers.append((b"cache-control", b"no-cache"))
        ex.status = response.status
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        ex.response_started = True
        tap = UsageTap(strip_usage_chunk=strip_usage, route=ex.route) if sse else None
        kept: list[bytes] = []
        kept_size = 0
        # A plain (non-SSE) body is sent one chunk behind: its last chunk goes out only after the
        # usage is counted, so a client that has read the whole body sees the count.
        held = b""
        try:
            while chunk := await response.read():
                if tap is not None:
                    chunk = tap.feed(chunk)
                    if tap.final and not ex.accounted:
                        # Count now, before the client sees the end: an SDK that stops reading
                        # at `[DONE]` may hang up before the stream's last empty chunk.
                        ex.usage = tap.usage
                        self._account(ex)
                    if tap.done:
                        ex.response_done = True
                    if not chunk:
                        continue
                else:
                    if kept_size <= _MAX_USAGE_SCAN:
                        kept.append(chunk)
                        kept_size += len(chunk)
                    chunk, held = held, chunk
                    if not chunk:
                        continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamError:
            ex.notes.append("engine closed the stream early")
        rest = tap.finish() if tap is not None else held
        if tap is not None:
            ex.usage = ex.usage or tap.usage  # a stream cut before its usage chunk: what we saw
        elif response.status == 200 and kept_size <= _MAX_USAGE_SCAN:
            ex.usage = usage_of_body(b"".join(kept))
        self._account(ex)  # before the last byte: a client that saw the end sees the count
        ex.response_done = True
        await send({"type": "http.response.body", "body": rest, "more_body": False})

    # ------------------------------------------------------------------------ bookkeeping

    async def _send_error(self, send: Send, ex: _Exchange, reply: _Reply) -> None:
        ex.status = reply.status
        if ex.response_started:
            return  # too late for a status; the body just ends
        headers = [(b"content-type", b"application/json")]
        if reply.retry_after:
            headers.append((b"retry-after", str(reply.retry_after).encode()))
        if "engine_state" in reply.extra:
            headers.append((b"x-engine-state", str(reply.extra["engine_state"]).encode()))
        if reply.status == 501:
            # The openai and anthropic SDKs retry any 5xx unless told not to: asking again
            # cannot help while the engine lacks the route.
            headers.append((b"x-should-retry", b"false"))
        body = apis.error_body(
            reply.status, reply.code, reply.message, route=ex.route, **reply.extra
        )
        headers.append((b"content-length", str(len(body)).encode()))
        with contextlib.suppress(OSError):
            await send({"type": "http.response.start", "status": reply.status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

    def _account(self, ex: _Exchange) -> None:
        if ex.accounted or ex.key is None or ex.status != 200:
            return
        ex.accounted = True
        usage = ex.usage or Usage()
        self.keys.record_usage(
            ex.key.id,
            address=ex.address,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )

    def _finish(self, ex: _Exchange) -> None:
        self._account(ex)
        usage = ex.usage or Usage()
        self.access.add(
            AccessRecord(
                at=time.time(),
                address=ex.address,
                key_name=ex.key.name if ex.key else "",
                key_id=ex.key.id if ex.key else "",
                method=ex.method,
                path=printable_path(ex.raw_path),
                status=ex.status,
                duration_ms=(time.perf_counter() - ex.started) * 1000,
                stream=ex.stream,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                note="; ".join(ex.notes),
            )
        )


# -------------------------------------------------------------------------------- helpers


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value)
    return None


def _x_api_key(scope: Scope) -> str:
    value = _header(scope, b"x-api-key")
    return value.decode("latin-1").strip() if value else ""


def _bearer(scope: Scope) -> str:
    value = _header(scope, b"authorization")
    if not value:
        return ""
    scheme, _, token = value.decode("latin-1").strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


async def _read_all(response: UpstreamResponse, limit: int) -> bytes | None:
    """A whole (small) engine response body, or None when it is longer than `limit`."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.read():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    too_large = _Reply(
        413,
        "request_too_large",
        f"The request body is larger than this endpoint accepts ({fmt_bytes(limit)}). "
        "Send fewer or smaller images.",
    )
    declared = _header(scope, b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise _Reply(400, "bad_content_length", "Content-Length is not a number.") from None
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(BODY_READ_TIMEOUT_S) as scope_timeout:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Reply(400, "client_disconnected", "The client went away.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
    if scope_timeout.cancelled_caught:
        raise _Reply(408, "request_timeout", "The request body did not arrive in time.")
    return b"".join(chunks)


def _parse_json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise _Reply(400, "invalid_json", f"The request body is not valid JSON ({err}).") from None
    if not isinstance(payload, dict):
        raise _Reply(400, "invalid_json", "The request body must be a JSON object.")
    return payload


def _prepare(
    payload: dict[str, Any], body: bytes, check: EngineCheck, route: str
) -> tuple[bytes, bool, bool]:
    """(body for the engine, is it a stream, strip the usage chunk we asked for)."""
    changed = False
    model = payload.get("model")
    if model is None and check.model:
        payload["model"] = check.model
        changed = True
    elif check.model and model != check.model:
        shown = model if isinstance(model, str) else json.dumps(model)
        raise _Reply(
            404,
            "model_not_found",
            f"The model `{shown[:200]}` does not exist here. This endpoint serves "
            f"`{check.model}`; GET /v1/models lists it.",
            param="model",
        )
    # The two fields the gateway itself acts on must have their types (as vLLM's schema says).
    if payload.get("stream") is not None and not isinstance(payload.get("stream"), bool):
        raise _Reply(400, "invalid_type", "`stream` must be true or false.", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _Reply(
            400, "invalid_type", "`stream_options` must be an object.", param="stream_options"
        )
    stream = payload.get("stream") is True
    strip = False
    if stream and route in (CHAT, COMPLETIONS):  # the agent APIs' streams always carry usage
        if options is None or options.get("include_usage") is not True:
            # Ask the engine for usage so the key's tokens are counted; hide that chunk again.
            payload["stream_options"] = {**(options or {}), "include_usage": True}
            changed = strip = True
    if changed:
        # ASCII escapes: JSON may carry lone surrogates ("\ud800") that UTF-8 cannot encode.
        body = json.dumps(payload, separators=(",", ":")).encode()
    return body, stream, strip
