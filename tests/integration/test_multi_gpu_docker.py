"""The multi-GPU launch spec on the real Docker engine: the created (never started: this machine
has no NVIDIA runtime) container's HostConfig.DeviceRequests carries exactly the profile's GPU
UUIDs, read through the simulated 8-GPU NVML (fixtures/multi_gpu_nvml.py), and its command is the
spec's. tests/unit/test_multi_gpu_launch.py compares the flags with the seed token for token."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from fixtures.multi_gpu_nvml import simulated_host

from appliance import settings as st
from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.launch import launch_spec_for
from appliance.engine.spec import LABEL_NAME

pytestmark = [pytest.mark.docker, pytest.mark.timeout(120)]


@pytest.mark.parametrize(
    ("kind", "profile", "gpus"),
    [("h200", "fp8-tp8", 8), ("b200", "nvfp4-tp4", 4), ("b200", "nvfp4-tp4-dp2", 8)],
)
def test_created_container_requests_exactly_the_profiles_gpus(
    docker_client, sim_image_ref: str, station_home: Path, kind: str, profile: str, gpus: int
) -> None:
    name = f"sst-mgpu-{uuid.uuid4().hex[:10]}"
    settings = st.with_changes(
        st.Settings(),
        {
            "engine.container_name": name,
            "engine.image": sim_image_ref,
            "engine.profile": profile,
            "engine.runtime": "docker",
            "engine.request_gpu": True,
        },
    )
    with simulated_host(kind, 8) as nvml:
        spec = launch_spec_for(settings, secrets=st.Secrets())
    try:
        handle = DockerRuntime().create(spec)
        attrs = docker_client.api.inspect_container(handle.id)
        (request,) = attrs["HostConfig"]["DeviceRequests"]
        assert request["DeviceIDs"] == nvml.uuids_by_index[:gpus]
        assert request["Capabilities"] == [["gpu"]]
        assert not request.get("Count")  # by UUID, never "all"
        assert attrs["HostConfig"]["IpcMode"] == "host"
        assert attrs["Config"]["Cmd"] == list(spec.args)
        assert attrs["State"]["Status"] == "created"
    finally:
        for container in docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_NAME}={name}"}
        ):
            container.remove(force=True)
