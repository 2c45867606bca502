"""Idle sleep never cuts an answer off, and a browser chat wakes a sleeping engine.

vLLM's `POST /sleep` aborts every running and waiting request (vllm 0.32
`entrypoints/serve/dev/sleep/api_router.py`: `mode` defaults to "abort"; `v1/engine/core.py`
`EngineCore.sleep` -> `pause_scheduler`), and the simulator does the same (the stream ends with
finish_reason "abort"). So these tests fail if the supervisor sleeps under a running request.

The supervisor's clock is injected: the test skips the idle time instead of waiting ten minutes.
Real parts otherwise: the simulator process started by the supervisor, the gateway, the chat
service over a real history.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import openai
import pytest
from fixtures.aio import run_async
from fixtures.sim import free_port
from gateway_kit import start_gateway, wait_until

from appliance import endpoint
from appliance import settings as st
from appliance.chat import client as chat
from appliance.chat import history as hist
from appliance.chat.service import ChatService, engine_view_from
from appliance.engine import EngineState, Supervisor

pytestmark = pytest.mark.timeout(180)

IDLE_S = 600.0  # the idle time the tests skip over
ANSWER_TOKENS = 60  # at 15 tokens/s: a stream of about four seconds


class SkippingClock:
    """Monotonic time plus whatever the test skipped."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


@pytest.fixture
def clock() -> SkippingClock:
    return SkippingClock()


@pytest.fixture
def sup(monkeypatch: pytest.MonkeyPatch, clock: SkippingClock):
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1")
    monkeypatch.setenv("STEP_SIM_TOKENS_PER_S", "15")
    monkeypatch.setenv("STEP_SIM_OUTPUT_TOKENS", str(ANSWER_TOKENS))
    monkeypatch.setenv("STEP_SIM_SLEEP_S", "0.2")
    port = free_port()
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.port": port,
            "engine.profile": "fp8-tp1",
            "engine.container_name": f"sleepy-{os.getpid()}-{port}",
            "engine.sleep_mode": True,  # --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1
            "engine.start_timeout_s": 60,
            "engine.stop_timeout_s": 10,
            "gateway.port": free_port(),
        },
    )
    supervisor = Supervisor.for_demo(
        settings,
        clock=clock,
        idle_sleep_s=IDLE_S,
        poll_interval_s=0.1,
        monitor_interval_s=0.1,
        outside_poll_s=0,
    )
    states: list[EngineState] = []
    supervisor.add_listener(lambda s: states.append(s.state))
    supervisor.states = states  # type: ignore[attr-defined]
    supervisor.start()
    supervisor.wait_ready(60)
    yield supervisor
    supervisor.stop(timeout_s=5)
    supervisor.close()


def engine_sleeping(sup: Supervisor) -> bool:
    response = endpoint.request("GET", f"{sup.engine_url}/is_sleeping", 5.0)
    return bool(response.json()["is_sleeping"])


def sleeps_after_idle(sup: Supervisor, clock: SkippingClock) -> None:
    """Skip the idle time and see the supervisor put the engine to sleep."""
    clock.skip(IDLE_S + 1)
    assert wait_until(lambda: sup.status().state == EngineState.SLEEPING, 60), sup.status()
    assert engine_sleeping(sup)


def chat_service(sup: Supervisor) -> ChatService:
    return ChatService(
        sup.settings, hist.History().open(), lambda: engine_view_from(sup), activity=sup
    )


async def browser_chat(
    svc: ChatService, text: str, started: threading.Event | None = None
) -> chat.Reply:
    """What the Chat tab does: submit (checks, stores), then stream the reply."""
    turn = await svc.submit(None, text, [], chat.SamplingOptions("low"))
    last = None
    async for reply in svc.respond(turn.conversation_id, chat.SamplingOptions("low")):
        last = reply
        if started is not None and (reply.content or reply.reasoning):
            started.set()
    assert last is not None
    return last


def test_a_gateway_stream_holds_off_idle_sleep_until_it_ends(
    sup: Supervisor, clock: SkippingClock
) -> None:
    stack = start_gateway(sup.settings, sup, sup.engine_url)
    try:
        client = stack.client()
        stream = client.chat.completions.create(
            model=sup.served_model_name,
            messages=[{"role": "user", "content": "Tell me a long story."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = iter(stream)
        first = next(chunks)
        assert first.choices  # the answer is streaming now
        clock.skip(IDLE_S + 1)  # idle time "elapsed" since the request began
        rest = list(chunks)
    finally:
        stack.gateway.stop()
    finishes = [c.choices[0].finish_reason for c in rest if c.choices]
    assert finishes[-1] in ("stop", "length"), finishes  # "abort" if the engine had slept
    assert rest[-1].usage.completion_tokens == ANSWER_TOKENS
    assert EngineState.SLEEPING not in sup.states  # type: ignore[attr-defined]
    # The idle time counts from the end of the request (the gateway notes it as it ends).
    assert wait_until(lambda: sup.idle_s() < IDLE_S, 30), sup.idle_s()
    assert sup.status().state == EngineState.READY
    sleeps_after_idle(sup, clock)


def test_a_direct_client_stream_holds_off_idle_sleep_through_the_engine_gauges(
    sup: Supervisor, clock: SkippingClock
) -> None:
    """A client that talks to the engine itself (not through the gateway, so no activity is
    noted): the supervisor still sees it in vllm:num_requests_running and does not sleep."""
    direct = openai.OpenAI(
        **endpoint.openai_kwargs(sup.engine_url), api_key=sup.engine_api_key, max_retries=0
    )
    stream = direct.chat.completions.create(
        model=sup.served_model_name,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        stream=True,
        stream_options={"include_usage": True},
        timeout=60,
    )
    chunks = iter(stream)
    assert next(chunks).choices
    clock.skip(IDLE_S + 1)
    rest = list(chunks)
    finishes = [c.choices[0].finish_reason for c in rest if c.choices]
    assert finishes[-1] in ("stop", "length"), finishes  # "abort" if the engine had slept
    assert rest[-1].usage.completion_tokens == ANSWER_TOKENS
    assert EngineState.SLEEPING not in sup.states  # type: ignore[attr-defined]
    # the gauges went to 0: the idle time starts then
    assert wait_until(lambda: sup.idle_s() < IDLE_S, 30), sup.idle_s()
    sleeps_after_idle(sup, clock)


def test_a_browser_chat_holds_off_idle_sleep_and_wakes_the_engine(
    sup: Supervisor, clock: SkippingClock
) -> None:
    svc = chat_service(sup)
    started = threading.Event()
    result: dict[str, chat.Reply] = {}

    def converse() -> None:
        try:
            result["reply"] = run_async(browser_chat(svc, "Tell me a long story.", started))
        finally:
            started.set()  # a failure shows below, not as a timeout

    talker = threading.Thread(target=converse)
    talker.start()
    assert started.wait(120), "the reply never started streaming"
    clock.skip(IDLE_S + 1)
    talker.join(120)
    assert "reply" in result, "the chat failed (its error is printed above)"
    reply = result["reply"]
    assert reply.phase == chat.FINISHED, (reply.phase, reply.error)
    assert reply.finish_reason in ("stop", "length")  # "abort" if the engine had slept
    assert EngineState.SLEEPING not in sup.states  # type: ignore[attr-defined]
    assert wait_until(lambda: sup.idle_s() < IDLE_S, 30), sup.idle_s()

    sleeps_after_idle(sup, clock)
    assert "sending a message wakes it" in svc.engine().not_ready_text()  # the Chat tab's line
    # A chat sent to the sleeping engine wakes it first, then answers in full.
    again = run_async(browser_chat(svc, "Are you awake?"))
    assert again.phase == chat.FINISHED, (again.phase, again.error)
    assert again.content
    assert sup.status().state == EngineState.READY
    assert not engine_sleeping(sup)
    run_async(svc.aclose())


def test_a_gateway_request_wakes_an_engine_that_slept_for_idleness(
    sup: Supervisor, clock: SkippingClock
) -> None:
    """Idle sleep on, start-on-request off (the default): a LAN client's request wakes the engine
    instead of getting 503 until the owner chats in the browser."""
    sup.settings = st.with_changes(sup.settings, {"engine.idle_sleep_minutes": 10})
    assert not sup.settings.gateway.start_on_request
    stack = start_gateway(sup.settings, sup, sup.engine_url)
    try:
        sleeps_after_idle(sup, clock)
        reply = stack.client().chat.completions.create(
            model=sup.served_model_name,
            messages=[{"role": "user", "content": "Are you awake?"}],
            max_tokens=8,
        )
        assert reply.choices[0].message.content or reply.choices[0].message.reasoning
        assert sup.status().state == EngineState.READY
        assert not engine_sleeping(sup)
        # Without idle sleep (and without start-on-request) a sleeping engine stays asleep.
        off = st.with_changes(sup.settings, {"engine.idle_sleep_minutes": 0})
        sup.settings = off
        stack.gateway.apply_settings(off)  # the gateway wakes the engine only with idle sleep on
        sup.sleep()
        with pytest.raises(openai.APIStatusError) as refused:
            stack.client().models.list()
        assert refused.value.status_code == 503
        assert refused.value.body["engine_state"] == "sleeping"
        assert engine_sleeping(sup)
    finally:
        stack.gateway.stop()


def test_sleep_aborts_a_running_stream_in_the_simulator_as_in_vllm(sup: Supervisor) -> None:
    """The premise of the tests above: /sleep under a running request aborts it."""
    url = sup.engine_url
    body = {
        "model": sup.served_model_name,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def run() -> tuple[list[str], dict, dict]:
        auth = {"Authorization": f"Bearer {sup.engine_api_key}"}  # the engine's per-start key
        async with endpoint.async_client(url, timeout=60, headers=auth) as client:
            lines: list[str] = []
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                reader = resp.aiter_lines()
                async for line in reader:
                    if line.startswith("data: {") and '"content"' in line:
                        break
                slept = asyncio.create_task(client.post("/sleep", params={"level": 1}))
                lines += [line async for line in reader if line.startswith("data: ")]
            asleep = (await slept).json() if (await slept).content else {}
            woke = await client.post("/wake_up")
            return lines, asleep, woke.json() if woke.content else {}

    lines, asleep, woke = run_async(run())
    assert lines[-1] == "data: [DONE]"
    assert '"finish_reason":"abort"' in "".join(lines).replace(" ", "")
    # Which JSON (if any) answers /sleep and /wake_up depends on the version imitated: 0.32
    # answers {"status": "sleeping", "level": 1} and {"status": "awake", "tags": null}.
    if asleep:
        assert asleep == {"status": "sleeping", "level": 1}
        assert woke == {"status": "awake", "tags": None}
