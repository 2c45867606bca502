"""The model tab in Chromium, driving a real engine container: the simulator image from the local
registry on the real Docker engine (runtime=docker, no GPU request, a container name per test).

- Start from the page: the timeline walks through the image pull (a fresh layer, so real bytes),
  the load phases from the engine's own log lines, then "Ready in ..."; Stop removes the container.
- A forced failure (CUDA out of memory at start) shows the reason, what to do and the log tail.
- Two pages clicking Start at once start one engine.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
import uuid
from pathlib import Path

import docker.errors
import pytest
from chat_page import screenshot
from playwright.sync_api import expect

from appliance.engine import phases

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
LABEL_NAME = "io.step-station.name"
PAD_BYTES = 24_000_000  # the fresh image layer the pull has to fetch
# A simulated GB300 (NVML cannot run here; tests/gpu/ covers the real one), see fake_nvml/.
FAKE_GPU_ENV = {
    "PYTHONPATH": str(Path(__file__).with_name("fake_nvml")),
    "STEP_FAKE_NVML": "gb300",
}


def containers(docker_client, name: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


@pytest.fixture
def engine_name(docker_client):
    """A container name unique to this test; whatever carries it is removed afterwards (the
    appliance leaves a real engine running on shutdown, to be adopted by the next start)."""
    name = f"ss-test-model-{uuid.uuid4().hex[:8]}"
    yield name
    for container in containers(docker_client, name):
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)


@pytest.fixture
def fresh_image(docker_client, sim_image_ref):
    """The simulator image plus one new random layer, pushed to the local registry and absent from
    the local store: pulling it downloads real bytes with progress."""
    repo = "localhost:5000/step-test/model-tab"
    tag = uuid.uuid4().hex[:12]
    dockerfile = f"FROM {sim_image_ref}\nRUN head -c {PAD_BYTES} /dev/urandom > /opt/pull-pad.bin\n"
    image, _ = docker_client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repo}:{tag}", rm=True, forcerm=True
    )
    for event in docker_client.api.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in event, event
    docker_client.images.remove(image.id, force=True)
    ref = f"{repo}:{tag}"
    yield ref
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(ref, force=True)


def docker_settings(tmp_path: Path, image: str, name: str) -> dict:
    model = tmp_path / "Step-3.7-Flash-FP8"  # a local checkpoint: nothing to download
    model.mkdir(exist_ok=True)
    return {
        "engine": {
            "runtime": "docker",
            "image": image,
            "request_gpu": False,
            "container_name": name,
            "profile": "fp8-tp1",
            "model_override": str(model),
            "hf_cache_dir": str(tmp_path / "hf"),
            "start_timeout_s": 180,
            "stop_timeout_s": 10,
        }
    }


def wait_up(app, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if app.proc.poll() is not None:
            pytest.fail(f"step-station up exited with {app.proc.returncode}:\n{app.log()}")
        if app.health():
            return
        time.sleep(0.2)
    pytest.fail(f"appliance not up after {timeout_s} s:\n{app.log()}")


def open_model_tab(page, url: str):
    page.goto(url)
    page.get_by_role("tab", name="Model").click()
    button = page.locator("#ss-engine-button")
    expect(button).to_be_visible()
    return button


def step_states(page) -> dict[str, str]:
    return page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll('#ss-timeline [data-step]')]
            .map(e => [e.dataset.step, e.dataset.status]))"""
    )


def test_start_from_the_page_walks_the_timeline_then_stop(
    appliance, page, docker_client, fresh_image, engine_name, tmp_path
):
    app = appliance(
        demo=False,
        wait=False,
        settings=docker_settings(tmp_path, fresh_image, engine_name),
        sim={"load_s": 8},
    )
    wait_up(app)
    button = open_model_tab(page, app.url)
    expect(button).to_have_text("Start")
    expect(page.locator("#ss-effective")).to_contain_text("once it starts")
    button.click()

    seen: dict[str, set[str]] = {}
    headlines: list[str] = []
    shot = False
    deadline = time.monotonic() + 150
    headline = page.locator("#ss-headline")
    while time.monotonic() < deadline:
        for name, status in step_states(page).items():
            seen.setdefault(name, set()).add(status)
        if headline.count():
            text = headline.inner_text()
            if not headlines or headlines[-1] != text:
                headlines.append(text)
            if text.startswith("Ready in"):
                break
        if not shot and "active" in seen.get(phases.LOADING_WEIGHTS, set()):
            screenshot(page, "model-starting.png", full_page=True)
            shot = True
        page.wait_for_timeout(200)
    else:
        pytest.fail(f"not ready; headlines {headlines}; steps {seen}\n{app.log()[-3000:]}")

    assert shot, f"never saw weights loading in progress: {seen}"
    assert any(h.startswith("Starting: ") for h in headlines), headlines
    # Every step was reached, in order, and ended done.
    names = page.evaluate(
        "() => [...document.querySelectorAll('#ss-timeline [data-step]')].map(e => e.dataset.step)"
    )
    expected = ["Pulling image", *dict.fromkeys((phases.LAUNCHING, *phases.LOG_PHASES)), "Ready"]
    assert names == expected
    assert all(step_states(page)[n] == "done" for n in names)
    # The load phases were seen under way before they were done (the page followed them live).
    assert any("active" in seen.get(n, set()) for n in phases.LOG_PHASES), seen
    # The pull fetched the fresh layer: its bytes are shown, complete.
    pull = page.locator('#ss-timeline [data-step="Pulling image"] .ss-detail')
    expect(pull).to_contain_text("(100%)")
    expect(pull).to_contain_text("MiB")
    # Effective settings from the engine's own log lines.
    effective = page.locator("#ss-effective")
    expect(effective).to_contain_text("806,736")  # KV-cache tokens, from "GPU KV cache size"
    expect(effective).to_contain_text("262,144 tokens")
    expect(effective).to_contain_text("FP8 weights, FP8 KV cache")
    expect(page.locator("#ss-log textarea")).to_have_value(
        re.compile("Starting vLLM"), timeout=10_000
    )
    expect(button).to_have_text("Stop")
    assert len(containers(docker_client, engine_name)) == 1
    screenshot(page, "model-ready.png", full_page=True)

    button.click()
    expect(button).to_have_text("Start", timeout=60_000)
    assert containers(docker_client, engine_name) == []
    expect(page.locator("#ss-headline")).to_contain_text("Stopped")


def test_forced_failure_shows_reason_what_to_do_and_log_tail(
    appliance, page, docker_client, sim_image_ref, engine_name, tmp_path
):
    app = appliance(
        demo=False,
        wait=False,
        settings=docker_settings(tmp_path, sim_image_ref, engine_name),
        sim={"load_s": 1, "fault": "oom"},
    )
    wait_up(app)
    button = open_model_tab(page, app.url)
    button.click()
    box = page.locator("#ss-failure-box")
    expect(box).to_be_visible(timeout=120_000)
    expect(box.locator(".ss-reason")).to_contain_text("out of GPU memory")
    expect(box.locator(".ss-what")).to_contain_text("What to do:")
    assert len(box.locator(".ss-what").inner_text()) > len("What to do: ") + 10
    expect(box.locator(".ss-tail")).to_contain_text("CUDA out of memory")
    expect(page.locator("#ss-headline")).to_contain_text("Failed:")
    # The supervisor retried once with safer settings before giving up, and the page says so.
    expect(page.locator("#ss-timeline")).to_contain_text("Retried once with")
    expect(button).to_have_text("Start")
    screenshot(page, "model-failed.png", full_page=True)


HIDE_JS = """(state) => {
  Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
  document.dispatchEvent(new Event('visibilitychange'));
}"""
CLICK_JS = "(el) => { const label = el.textContent.trim(); el.click(); return label; }"


def test_two_pages_clicking_start_at_once_start_one_engine(
    appliance, page, browser, docker_client, sim_image_ref, engine_name, tmp_path
):
    app = appliance(
        demo=False,
        wait=False,
        settings=docker_settings(tmp_path, sim_image_ref, engine_name),
        sim={"load_s": 3},
    )
    wait_up(app)
    other_context = browser.new_context(viewport={"width": 1440, "height": 1000})
    other = other_context.new_page()
    try:
        first = open_model_tab(page, app.url)
        second = open_model_tab(other, app.url)
        expect(first).to_have_text("Start")
        expect(second).to_have_text("Start")
        # Both clicks must leave while both pages show "Start": if the second page's
        # once-a-second refresh learns of the first start in between, its button turns into
        # Stop and its click is a real stop (as the owner would have seen it). Under load the
        # two clicks can be far apart (a CI run with a CPU hog saw exactly that), so the pages
        # are put in the background first: the tab's timer stops there (ui/polling.py) and the
        # labels stay. Each click returns the label it was sent with.
        for p in (page, other):
            p.evaluate(HIDE_JS, "hidden")
        seen = [button.evaluate(CLICK_JS) for button in (first, second)]
        for p in (page, other):
            p.evaluate(HIDE_JS, "visible")
        assert seen == ["Start", "Start"]
        # Whichever click reached the engine second is told so (a toast lasts a few seconds, so
        # look now, not after the start): on exactly one of the two pages.
        told = [p.get_by_text("already starting or running") for p in (page, other)]
        deadline = time.monotonic() + 30
        while not any(t.is_visible() for t in told) and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert sum(t.is_visible() for t in told) == 1
        for p in (page, other):
            expect(p.locator("#ss-headline")).to_contain_text("Ready in", timeout=120_000)
            expect(p.locator("#ss-engine-button")).to_have_text("Stop")
        assert len(containers(docker_client, engine_name)) == 1
        managed = docker_client.containers.list(
            all=True, filters={"label": "io.step-station.managed=true", "name": engine_name}
        )
        assert len(managed) == 1

        # Stop from the second page: the first page follows.
        second.click()
        expect(second).to_have_text("Start", timeout=60_000)
        expect(first).to_have_text("Start", timeout=10_000)
        assert containers(docker_client, engine_name) == []
    finally:
        other_context.close()


def test_profile_picker_offers_what_fits_with_reasons_and_switches(appliance, page, engine_name):
    """On a (simulated) DGX Station GPU: the two Station profiles are offered, the others are
    listed with the planner's reasons; MTP and sleep mode are offered where the profile allows."""
    app = appliance(
        demo=False,
        wait=False,
        env=FAKE_GPU_ENV,
        settings={"engine": {"container_name": engine_name}},
    )
    wait_up(app)
    open_model_tab(page, app.url)
    profile = page.locator("#ss-profile")
    expect(profile.locator("input")).to_have_value(re.compile("^fp8-tp1"))
    profile.locator("input").click()
    options = page.get_by_role("option")
    expect(options).to_have_count(2)
    expect(options.nth(0)).to_contain_text("fp8-tp1")
    expect(options.nth(1)).to_contain_text("nvfp4-tp1")
    unfit = page.locator("#ss-unfit")
    expect(unfit).to_contain_text("Not offered on this machine")
    expect(unfit).to_contain_text("bf16-tp8: needs 8 GPUs, this machine has 1")
    expect(unfit).to_contain_text("nvfp4-tp4: needs 4 GPUs, this machine has 1")

    mtp = page.locator("#ss-mtp input")
    sleep = page.locator("#ss-sleep input")
    expect(mtp).to_be_enabled()  # FP8 keeps the MTP weights
    expect(sleep).to_be_enabled()
    options.nth(1).click()  # NVFP4: the checkpoint ships no MTP weights
    expect(mtp).to_be_disabled()
    expect(mtp).not_to_be_checked()
    expect(page.locator("#ss-mtp")).to_contain_text("no MTP weights")
