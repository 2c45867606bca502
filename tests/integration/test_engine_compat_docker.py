"""The engine checks before a start, against real parts: the local Docker engine and registry
(scripts/harness.sh; the simulator image as `localhost:5000/vllm/vllm-openai:stepfun37`) and the
real vLLM 0.32 program (scripts/realvllm.sh, tests/fixtures/realvllm.py).

- the image tag's platforms, asked of the registry before pulling;
- the flags: `vllm serve --help=all` in a throwaway container / the real program, cached, then
  unknown no-op flags dropped with a note and other unknown flags refused;
- the chat template warning when `reasoning_effort` is not used, on the tiny models.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from engine_net import free_port
from fixtures.realvllm import (
    ENGINE_ENV,
    MODELS,
    SERVED,
    engine_env,
    require_real_vllm,
)

from appliance import profiles
from appliance import settings as st
from appliance.engine import EngineState, Supervisor, compat
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import LABEL_NAME, LaunchSpec
from appliance.errors import EngineError, ImagePullError

TEST_REPO = "localhost:5000/step-station-test/compat"


@pytest.fixture
def dk(docker_client, sim_image_ref):
    del sim_image_ref
    return docker_client


def _ours(dk, name: str) -> list:
    return dk.containers.list(all=True, filters={"label": f"{LABEL_NAME}={name}"})


@pytest.fixture
def settings(dk, sim_image_ref: str, monkeypatch: pytest.MonkeyPatch):
    s = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": f"sst-compat-{uuid.uuid4().hex[:10]}",
            "engine.port": free_port(),
            "engine.image": sim_image_ref,
            "engine.profile": "fp8-tp1",
            "engine.request_gpu": False,  # this Docker engine has no NVIDIA runtime
            "engine.start_timeout_s": 120,
            "engine.stop_timeout_s": 10,
        },
    )
    monkeypatch.setenv("STEP_SIM_LOAD_S", "1.5")
    yield s
    for container in _ours(dk, s.engine.container_name):
        container.remove(force=True)


@pytest.fixture
def make_sup(settings):
    made: list[Supervisor] = []

    def make(changed: st.Settings | None = None, **kwargs) -> Supervisor:
        """A supervisor on the fixture's settings, or on `changed` (a test's own copy)."""
        kwargs.setdefault("download_weights", False)
        sup = Supervisor(changed or settings, poll_interval_s=0.1, outside_poll_s=0, **kwargs)
        made.append(sup)
        return sup

    yield make
    for sup in made:
        sup.stop(timeout_s=10)
        sup.close()


# ---------------------------------------------------------------------------- platforms


@pytest.mark.docker
def test_the_registry_tag_offers_this_machine_and_not_s390x(dk, registry_image: str) -> None:
    DockerRuntime().check_platform(registry_image)  # linux/amd64 here: no error
    with pytest.raises(ImagePullError) as caught:
        DockerRuntime(platform="linux/s390x").check_platform(registry_image)
    text = str(caught.value)
    assert f"The image {registry_image} has no linux/s390x variant" in text
    assert "linux/amd64" in text  # what it does offer
    assert caught.value.hint
    assert "engine.image" in caught.value.hint


@pytest.mark.docker
def test_a_missing_platform_fails_before_any_byte_is_pulled(dk, sim_image_ref: str) -> None:
    """A tag in the registry that is not on this machine: refused for s390x without pulling it,
    pulled for the host's own platform."""
    tag = uuid.uuid4().hex[:12]
    ref = f"{TEST_REPO}:{tag}"
    dk.images.get(sim_image_ref).tag(TEST_REPO, tag=tag)
    try:
        for event in dk.images.push(TEST_REPO, tag=tag, stream=True, decode=True):
            assert "error" not in event, event
        dk.images.remove(ref)
        spec = LaunchSpec(
            name="x", image=ref, args=("m",), profile="fp8-tp1", served_model_name="s", host_port=1
        )
        seen: list[str] = []
        with pytest.raises(ImagePullError, match="has no linux/s390x variant"):
            DockerRuntime(platform="linux/s390x").ensure_image(
                spec, lambda d, t, line: seen.append(line)
            )
        assert seen == []  # the pull never began
        assert not DockerRuntime().has_image(ref)
        DockerRuntime().ensure_image(spec, lambda d, t, line: seen.append(line))
        assert DockerRuntime().has_image(ref)
    finally:
        for image in dk.images.list(name=TEST_REPO):
            if ref in image.tags:
                dk.images.remove(ref)


@pytest.mark.docker
def test_registry_down_is_a_clear_error_before_pulling(dk) -> None:
    ref = f"localhost:{free_port()}/vllm/vllm-openai:stepfun37"
    with pytest.raises(ImagePullError) as caught:
        DockerRuntime().check_platform(ref)
    assert f"Pulling {ref} failed" in str(caught.value)
    assert "connection refused" in str(caught.value)
    assert caught.value.hint
    assert "registry cannot be reached" in caught.value.hint


# ------------------------------------------------------------------------------- flags


@pytest.mark.docker
def test_the_image_prints_its_flags_in_a_throwaway_container(
    dk, sim_image_ref: str, docker_labels: dict[str, str]
) -> None:
    code, text = DockerRuntime().serve_help(sim_image_ref, 120, labels=docker_labels)
    assert code == 0, text[-500:]
    known = compat.parse_help(text)
    assert {"--port", "--disable-cascade-attn", "--enable-sleep-mode"} <= known
    selector = [f"{k}={v}" for k, v in docker_labels.items()]
    assert dk.containers.list(all=True, filters={"label": selector}) == []  # removed after


@pytest.mark.docker
def test_start_checks_the_flags_once_per_image_and_keeps_known_ones(dk, settings, make_sup) -> None:
    sup = make_sup()
    sup.start()
    status = sup.wait_ready(180)
    assert status.notes == []
    digest = DockerRuntime().image_digest(settings.engine.image)
    cached = compat.load_cached(compat.cache_folder(), f"image:{digest}")
    assert cached is not None
    assert "--disable-cascade-attn" in cached
    (container,) = _ours(dk, settings.engine.container_name)
    assert "--disable-cascade-attn" in container.attrs["Args"]

    class NoHelp(DockerRuntime):
        def serve_help(self, ref, timeout_s, labels=None):  # noqa: ANN001, ANN202
            raise AssertionError("the image was asked again")

    spec = launch_spec_for(settings, runtime="docker", download_weights=False)
    assert compat.check_flags(spec, NoHelp()).args == spec.args  # from the cache


@pytest.mark.docker
def test_an_image_without_a_no_op_flag_starts_without_it_and_says_so(
    dk, settings, make_sup
) -> None:
    """The image's help as a vLLM without --disable-cascade-attn prints it (seeded in the cache
    under the image's digest, which is what a check of such an image stores)."""
    runtime = DockerRuntime()
    digest = runtime.image_digest(settings.engine.image)
    code, text = runtime.serve_help(settings.engine.image, 120)
    assert code == 0
    without = compat.parse_help(text) - {"--disable-cascade-attn", "--no-disable-cascade-attn"}
    folder = compat.cache_folder()
    if folder.is_symlink():  # the session's shared cache (tests/conftest.py): seed a private one
        folder.unlink()
        folder.mkdir()
    compat.save_cached(folder, f"image:{digest}", without, "seeded")

    sup = make_sup(runtime=runtime)
    sup.start()
    status = sup.wait_ready(180)
    (note,) = status.notes
    assert note.startswith("Dropped --disable-cascade-attn")
    assert settings.engine.image in note
    (container,) = _ours(dk, settings.engine.container_name)
    assert "--disable-cascade-attn" not in container.attrs["Args"]
    assert "--disable-cascade-attn" not in status.effective["command"]
    assert status.to_dict()["notes"] == [note]


@pytest.mark.docker
def test_an_unknown_flag_refuses_the_start_naming_it(dk, settings, make_sup) -> None:
    def with_bogus_flag(sup: Supervisor, profile: str | None) -> LaunchSpec:
        spec = launch_spec_for(sup.settings, profile=profile, runtime="docker")
        return dataclasses.replace(spec, args=(*spec.args, "--bogus-flag", "1"))

    sup = make_sup(spec_builder=with_bogus_flag)
    sup.start()
    with pytest.raises(EngineError, match="--bogus-flag"):
        sup.wait_ready(180)
    status = sup.status()
    assert status.state == EngineState.FAILED
    assert f"The image {settings.engine.image} does not know" in status.message
    assert "unrecognized arguments" in status.message
    assert _ours(dk, settings.engine.container_name) == []  # nothing was launched


# --------------------------------------------------------------------------- real vLLM


@pytest.mark.timeout(900)
def test_real_vllm_rejects_an_unknown_flag_as_the_check_predicts(tmp_path: Path) -> None:
    exe = require_real_vllm()
    # The premise, from the real program: exit 2 from the top-level parser.
    done = subprocess.run(
        [str(exe), "serve", str(MODELS["std"]), "--bogus-flag", "--disable-cascade-attn"],
        capture_output=True,
        text=True,
        env=engine_env(),
        timeout=600,
        check=False,
    )
    assert done.returncode == 2
    assert "vllm: error: unrecognized arguments: --bogus-flag" in done.stderr
    assert "--disable-cascade-attn" not in done.stderr.split("unrecognized arguments:")[1]

    engine = st.EngineSettings(sleep_mode=True)
    args = profiles.build_vllm_args(profiles.get_profile("fp8-tp1"), engine)
    spec = LaunchSpec(
        name="e",
        image="",
        args=tuple(args),
        profile="fp8-tp1",
        served_model_name=SERVED,
        host_port=1,
        runtime="process",
        env=tuple(sorted(ENGINE_ENV.items())),
        executable=(str(exe), "serve"),
    )
    cache = tmp_path / "flags"
    check = compat.check_flags(spec, None, cache_dir=cache)
    assert check.args == tuple(args)  # 0.32 knows every flag of the Station profile
    assert check.notes == ()
    (cached,) = cache.glob("*.json")
    assert "vllm==0.32.0" in cached.read_text()
    with pytest.raises(EngineError, match=r"The program .*vllm does not know the flag --bogus"):
        compat.check_flags(
            dataclasses.replace(spec, args=(*args, "--bogus-flag")), None, cache_dir=cache
        )
    assert list(cache.glob("*.json")) == [cached]  # answered from the cache


def _tiny_std_without_effort(folder: Path) -> Path:
    """The tiny standard model with its template's `reasoning_effort` renamed."""
    shutil.copytree(MODELS["std"], folder)
    template = folder / "chat_template.jinja"
    text = template.read_text(encoding="utf-8")
    assert "reasoning_effort" in text
    template.write_text(text.replace("reasoning_effort", "thinking_level"), encoding="utf-8")
    return folder


def test_the_tiny_models_templates_use_reasoning_effort() -> None:
    require_real_vllm()
    for model in MODELS.values():
        spec = LaunchSpec(name="e", image="", args=(str(model),), profile="p",
                          served_model_name="s", host_port=1, runtime="process")  # fmt: skip
        assert compat.model_templates(model)
        assert compat.template_notes(spec) == [], model


@pytest.mark.docker
def test_a_start_warns_when_the_model_template_drops_the_effort(
    dk, settings, make_sup, tmp_path: Path
) -> None:
    """A local checkpoint (mounted read-only into the engine): the tiny model whose template
    does not read reasoning_effort. The engine serves; the start carries the warning."""
    require_real_vllm()  # the tiny models come with the real-vLLM harness
    model = _tiny_std_without_effort(tmp_path / "tiny-no-effort")
    settings = st.with_changes(settings, {"engine.model_override": str(model)})
    sup = make_sup(settings)
    sup.start()
    status = sup.wait_ready(180)
    (note,) = [n for n in status.notes if "reasoning_effort" in n]
    assert "chat template (chat_template.jinja) does not use reasoning_effort" in note
    assert note in status.to_dict()["notes"]
