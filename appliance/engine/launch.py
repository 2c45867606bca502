"""Settings -> the launch spec: picks the profile (the planner for "auto") and the GPU by UUID,
then builds the frozen spec from `profiles.build_vllm_args`."""

from __future__ import annotations

import shutil
import sys

from appliance import endpoint, moe_folder, profiles
from appliance import settings as st
from appliance.engine import engine_key
from appliance.engine.spec import LaunchSpec, build_launch_spec, listen_host
from appliance.errors import EngineError, HardwareError, SettingsError

DEMO_PROFILE = "fp8-tp1"
SIMULATOR = (sys.executable, "-m", "appliance.simulator")


def choose_profile(engine: st.EngineSettings, name: str, *, demo: bool) -> tuple[str, str]:
    """(profile name, GPU UUID or "") for `name`; "auto" asks the planner about this machine."""
    if demo:
        return (DEMO_PROFILE if name == "auto" else name), ""
    if name != "auto" and (engine.gpu_uuid or not engine.request_gpu):
        return name, engine.gpu_uuid
    from appliance import hardware, planner  # local: NVML is touched only when needed

    chosen = planner.plan(hardware.detect(), engine_settings=engine)
    if name != "auto":
        fit = next((f for f in chosen.profiles if f.name == name), None)
        return name, (fit.gpu_uuid or "") if fit else ""
    if chosen.chosen is None:
        raise HardwareError(
            f"No launch profile fits this machine: {chosen.chosen_reason}.",
            hint="`step-station plan` shows the numbers; set one with "
            "`step-station config set engine.profile NAME` to try anyway.",
        )
    fit = chosen.chosen_fit
    return chosen.chosen, (fit.gpu_uuid or "") if fit else ""


def _executable(runtime: str, demo: bool) -> tuple[str, ...]:
    if runtime != "process":
        return ()
    if demo:
        return SIMULATOR
    vllm = shutil.which("vllm")
    if vllm is None:
        raise EngineError(
            "The process runtime needs `vllm` on PATH and it is not installed.",
            hint="Install it (`pip install 'step-station[native]'`) or use Docker "
            "(`step-station config set engine.runtime docker`).",
        )
    return (vllm, "serve")


def launch_spec_for(
    settings: st.Settings,
    *,
    profile: str | None = None,
    runtime: str | None = None,
    demo: bool = False,
    download_weights: bool = True,
    secrets: st.Secrets | None = None,
) -> LaunchSpec:
    """The spec the supervisor hands to its runtime for one start."""
    engine = settings.engine
    kind = runtime or engine.runtime
    name, gpu_uuid = choose_profile(engine, profile or engine.profile, demo=demo)
    prof = profiles.get_profile(name)
    token = secrets.hf_token if secrets is not None else st.hf_token()
    return build_launch_spec(
        engine,
        profile=prof.name,
        served_model_name=prof.served_model_name,
        vllm_args=profiles.build_vllm_args(
            prof,
            engine,
            listen_host=listen_host(engine, kind),
            uds=endpoint.CONTAINER_SOCKET if kind == "docker" else "",
        ),
        engine_env=profiles.engine_environment(prof, engine),
        runtime=kind,
        gpu_uuid=gpu_uuid,
        hf_token=token,
        executable=_executable(kind, demo),
        download_weights=download_weights,
        tuning=moe_folder.tuning_for_start(
            moe_folder.default_folder(), in_container=kind == "docker"
        ),
    )


def with_fresh_engine_key(spec: LaunchSpec) -> LaunchSpec:
    """The spec with a new key for this start, written to its private file (engine_key.py).

    In a container, the HF token goes through the same private folder, and only when the engine
    itself downloads (the appliance's own download leaves it offline)."""
    token = spec.hf_token if spec.runtime == "docker" and spec.engine_fetches_weights else ""
    return spec.with_engine_key(engine_key.issue(spec.name, hf_token=token))


def served_name_for(settings: st.Settings) -> str:
    """The model name clients send, from the settings alone (no hardware probe)."""
    name = settings.engine.profile
    if name == "auto":
        name = DEMO_PROFILE  # both Station profiles serve the same name
    try:
        return profiles.get_profile(name).served_model_name
    except SettingsError:
        return profiles.STATION_SERVED_NAME
