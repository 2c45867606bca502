"""The pull's platform decision: does the registry's image offer a build this host runs?

`platform_offered` reads the `Platforms` list Docker's distribution inspect returns (real
answers are in tests/integration/test_engine_platform_docker.py and, for a real arm64 image,
test_aarch64_install.py). The entries below are the shapes registries give: Docker Hub's
official images say arm64/v8, buildx's indexes say arm64 without a variant.
"""

from __future__ import annotations

import pytest

from appliance.engine.docker_runtime import platform_offered

AMD64 = {"os": "linux", "architecture": "amd64"}
ARM64 = {"os": "linux", "architecture": "arm64"}
ARM64_V8 = {"os": "linux", "architecture": "arm64", "variant": "v8"}
ARM_V7 = {"os": "linux", "architecture": "arm", "variant": "v7"}
WINDOWS = {"os": "windows", "architecture": "amd64", "os.version": "10.0.17763.1"}


@pytest.mark.parametrize(
    ("host", "platforms", "offered"),
    [
        ("linux/arm64", [AMD64], False),  # an amd64-only image on a DGX Station: refused
        ("linux/amd64", [ARM64], False),  # and the other way round
        ("linux/arm64", [AMD64, ARM64], True),
        ("linux/arm64", [AMD64, ARM64_V8], True),  # docker-py's has_platform says no here
        ("linux/arm64/v8", [ARM64], True),
        ("linux/aarch64", [ARM64_V8], True),  # uname's name for it
        ("linux/amd64", [AMD64, ARM64_V8], True),
        ("linux/amd64", [WINDOWS], False),  # same arch, other OS
        ("linux/arm/v7", [ARM_V7], True),
        ("linux/arm/v6", [ARM_V7], False),
        ("linux/s390x", [AMD64, ARM64], False),
        ("linux/arm64", [], False),
    ],
)
def test_platform_offered(host: str, platforms: list[dict[str, str]], offered: bool) -> None:
    assert platform_offered(host, platforms) is offered
