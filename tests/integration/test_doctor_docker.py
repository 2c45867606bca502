"""Doctor against the real Docker engine (scripts/harness.sh up starts one): the same checks the
unit tests fake at the Docker seam, here with the real probe."""

from __future__ import annotations

import json
import os

import pytest

from appliance.cli import main
from appliance.engine import docker_runtime
from appliance.errors import DockerUnavailableError

pytestmark = pytest.mark.docker


@pytest.fixture
def real_docker() -> docker_runtime.DockerProbe:
    try:
        return docker_runtime.docker_probe()
    except DockerUnavailableError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI needs the Docker engine (scripts/harness.sh up): {err}")
        pytest.skip(f"no Docker engine here: {err}")


def test_doctor_reports_the_real_docker_version(
    real_docker: docker_runtime.DockerProbe, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["doctor", "--json"])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["docker"]["status"] == "pass"
    assert real_docker.version in checks["docker"]["detail"]
    assert real_docker.api_version in checks["docker"]["detail"]
    runtime = checks["nvidia-runtime"]
    if "nvidia" in real_docker.runtimes:
        assert runtime["status"] == "pass"
    else:
        # This engine has no NVIDIA runtime (reference/machines.md): unless a CDI spec or the
        # toolkit hook is present, the doctor must say a GPU container cannot start.
        assert runtime["status"] in {"pass", "fail"}
        if runtime["status"] == "fail":
            assert "nvidia-ctk runtime configure" in runtime["fix"]
    assert real_docker.root_dir  # the disk check compares the image's file system too
