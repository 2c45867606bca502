"""Doctor warns on a Docker release with a known way around loopback-only port publishing."""

from __future__ import annotations

import pytest

from appliance import doctor
from appliance.doctor import PASS, WARN, DockerFacts
from appliance.settings import Settings, with_changes


@pytest.mark.parametrize(
    ("version", "status", "named"),
    [
        ("20.10.24+dfsg1", WARN, "moby/moby#45610"),  # Debian's docker.io, as on the CI machine
        ("27.5.1", WARN, "28.0.0"),
        ("28.0.0", WARN, "CVE-2025-54388"),
        ("28.3.2", WARN, "CVE-2025-54388"),
        ("28.3.3", PASS, "fixes"),
        ("29.1.0", PASS, "fixes"),
        ("unknown", PASS, "not recognised"),
    ],
)
def test_docker_version_warning(version: str, status: str, named: str) -> None:
    check = doctor.check_docker_version(Settings(), DockerFacts(version=version, api_version="1"))
    assert check.status == status
    assert named in check.detail
    if status == WARN:
        assert "28.3.3" in check.detail
        assert check.fix == doctor.DOCKER_UPGRADE_FIX


def test_not_checked_without_docker() -> None:
    settings = with_changes(Settings(), {"engine.runtime": "process"})
    assert doctor.check_docker_version(settings, DockerFacts()).status == PASS
    assert doctor.check_docker_version(Settings(), DockerFacts(error="down")).status == PASS
