"""The engine pull's platform check against the real local registry (scripts/harness.sh): the
simulator image there is amd64-only, so a DGX Station (linux/arm64, injected at the
DockerRuntime(platform=...) seam) must be refused before a byte is pulled, naming the image and
the platforms it has; this host (amd64) pulls it.

The reverse, a real arm64-only image refused on this amd64 host with nothing injected, is in
test_aarch64_install.py (it needs the arm64 root scripts/test_aarch64.sh builds).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import docker  # noqa: TID251 - the test sets up registry tags directly
import pytest

from appliance.engine.docker_runtime import DockerRuntime
from appliance.engine.spec import LaunchSpec
from appliance.errors import ImagePullError

TEST_REPO = "localhost:5000/step-station-test/platform"


def _recorder(seen: list[str]) -> Callable[[int, int, str], None]:
    return lambda done, total, line: seen.append(line)


@pytest.mark.docker
def test_amd64_only_image_is_refused_on_an_arm64_host_before_pulling(
    docker_client: docker.DockerClient, sim_image_ref: str
) -> None:
    assert DockerRuntime().host_platform() == "linux/amd64"  # this machine; a Station says arm64
    tag = uuid.uuid4().hex[:12]
    ref = f"{TEST_REPO}:{tag}"
    docker_client.images.get(sim_image_ref).tag(TEST_REPO, tag=tag)
    try:
        for event in docker_client.images.push(TEST_REPO, tag=tag, stream=True, decode=True):
            assert "error" not in event, event
        docker_client.images.remove(ref)
        offered = docker_client.images.get_registry_data(ref).attrs["Platforms"]
        assert [(p["os"], p["architecture"]) for p in offered] == [("linux", "amd64")]
        spec = LaunchSpec(
            name="x", image=ref, args=("m",), profile="fp8-tp1", served_model_name="s", host_port=1
        )
        for station in ("linux/arm64", "linux/arm64/v8"):
            seen: list[str] = []
            with pytest.raises(ImagePullError) as caught:
                DockerRuntime(platform=station).ensure_image(spec, _recorder(seen))
            text = str(caught.value)
            assert f"The image {ref} has no {station} variant (it offers: linux/amd64)" in text
            assert "nothing was pulled" in text
            assert caught.value.hint
            assert "engine.image" in caught.value.hint
            assert seen == []  # the pull never began
            assert not DockerRuntime().has_image(ref)
        # This host's own platform: the same tag pulls.
        DockerRuntime().ensure_image(spec, lambda d, t, line: None)
        assert DockerRuntime().has_image(ref)
    finally:
        for image in docker_client.images.list(name=TEST_REPO):
            if ref in image.tags:
                docker_client.images.remove(ref)
