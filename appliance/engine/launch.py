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


def choose_profile(
    engine: st.EngineSettings, name: str, *, demo: bool
) -> tuple[str, tuple[str, ...]]:
    """(profile name, the GPUs' UUIDs or ()) for `name`; "auto" asks the planner about this
    machine. A multi-GPU profile (tensor x data parallel) gets as many GPUs as it needs, by UUID,
    or a clear error where the machine has fewer; `engine.gpu_uuid` pins one-GPU profiles only.
    () asks the runtime for every GPU (no GPU seen here: the runtime decides)."""
    if demo:
        return (DEMO_PROFILE if name == "auto" else name), ()
    if name != "auto" and not engine.request_gpu:
        return name, ()
    if name != "auto" and engine.gpu_uuid and profiles.get_profile(name).gpu_count == 1:
        return name, (engine.gpu_uuid,)
    from appliance import hardware, planner  # local: NVML is touched only when needed

    hw = hardware.detect()
    chosen = planner.plan(hw, engine_settings=engine)
    if name == "auto" and chosen.chosen is None:
        raise HardwareError(
            f"No launch profile fits this machine: {chosen.chosen_reason}.",
            hint="`step-station plan` shows the numbers; set one with "
            "`step-station config set engine.profile NAME` to try anyway.",
        )
    name = chosen.chosen if name == "auto" and chosen.chosen else name
    fit = next((f for f in chosen.profiles if f.name == name), None)
    uuids = tuple(fit.gpu_uuids) if fit else ()
    need = profiles.get_profile(name).gpu_count
    if need > 1 and hw.gpus and len(uuids) < need:
        raise HardwareError(
            f"The {name} profile runs on {need} GPUs and this machine has {len(hw.gpus)}.",
            hint="`step-station plan` lists the profiles that fit; choose one with "
            "`step-station config set engine.profile NAME`.",
        )
    return name, uuids


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
    name, gpu_uuids = choose_profile(engine, profile or engine.profile, demo=demo)
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
        gpu_uuids=gpu_uuids,
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
