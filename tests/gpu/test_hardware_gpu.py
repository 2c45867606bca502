"""The hardware probe, the planner and the doctor on a real NVIDIA GPU.

Run on the device machine (one H200): `pytest -q -s -m gpu tests/gpu/test_hardware_gpu.py`, or
`scripts/gpu_plan_doctor.sh`, which also prints `plan`, `plan --json` and `doctor --json` for the
issue note. Skipped where NVML finds no GPU.

What must hold: NVML finds the GPU with its name, UUID and compute capability (checked against
nvidia-smi when it is there), and `plan` / `doctor` on the detected machine give the same verdict
as the matching preset (`h200` for one H200, `8xh200` for eight).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import pytest

from appliance import doctor, hardware, planner
from appliance.commands import doctor as doctor_command
from appliance.commands import plan as plan_command
from appliance.settings import Settings

pytestmark = pytest.mark.gpu

# A busy GPU is a legitimate difference from a preset (which has nothing running): leave it out.
MACHINE_DEPENDENT = {"memory_in_use"}


@pytest.fixture(scope="module")
def detected() -> hardware.Hardware:
    hw = hardware.detect()
    if not hw.gpus:
        pytest.skip(f"no NVIDIA GPU here ({hw.nvml_error})")
    return hw


@pytest.fixture(scope="module")
def preset_name(detected: hardware.Hardware) -> str:
    names = {g.name for g in detected.gpus}
    if names == {"NVIDIA H200"} and len(detected.gpus) in (1, 8):
        return "h200" if len(detected.gpus) == 1 else "8xh200"
    pytest.skip(f"no preset for {detected.describe()}")


def main(argv: list[str]) -> int:
    """`step-station plan|doctor ...` with only those two commands registered: the GPU machine may
    lack what the other commands import (httpx, fastapi), which these two never need."""
    parser = argparse.ArgumentParser(prog="step-station")
    sub = parser.add_subparsers()
    plan_command.register(sub)
    doctor_command.register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


def _verdict(result: planner.Plan) -> dict[str, tuple[bool, list[str]]]:
    return {
        f.name: (f.fits, [c for c in f.reason_codes if c not in MACHINE_DEPENDENT])
        for f in result.profiles
    }


def test_nvml_finds_the_gpu(detected: hardware.Hardware) -> None:
    for gpu in detected.gpus:
        print(f"GPU {gpu.index}: {gpu.uuid} {gpu.describe()}")
        assert gpu.name.startswith("NVIDIA ")
        assert gpu.uuid.startswith("GPU-")
        assert gpu.compute_capability is not None
        assert gpu.compute_capability[0] >= 7
        assert gpu.memory_total_bytes is not None
        assert gpu.memory_total_bytes > 8 * 1024**3
        assert gpu.memory_used_bytes is not None
    assert detected.driver_version
    assert detected.nvml_error is None
    print(f"driver {detected.driver_version}")


def test_nvml_agrees_with_nvidia_smi(detected: hardware.Hardware) -> None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    out = subprocess.run(
        [smi, "--query-gpu=index,uuid,name,compute_cap,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = [[cell.strip() for cell in line.split(",")] for line in out.strip().splitlines()]
    assert len(rows) == len(detected.gpus)
    for row, gpu in zip(rows, detected.gpus, strict=True):
        index, uuid, name, cc, total = row
        assert int(index) == gpu.index
        assert uuid == gpu.uuid
        assert name == gpu.name
        assert cc == "{}.{}".format(*gpu.compute_capability)  # type: ignore[str-format]
        assert int(total.split()[0]) * 1024**2 == gpu.memory_total_bytes


def test_readings_are_live(detected: hardware.Hardware) -> None:
    readings = hardware.read_gpus()
    assert [r.uuid for r in readings] == [g.uuid for g in detected.gpus]
    for reading in readings:
        print(reading)
        assert reading.memory_total_bytes == detected.gpus[reading.index].memory_total_bytes
        assert reading.temperature_c is not None
        assert 0 < reading.temperature_c < 110
        assert reading.power_w is not None
        assert reading.power_w > 0
        assert reading.utilization_pct is not None


def test_preset_matches_what_nvml_reports(detected: hardware.Hardware, preset_name: str) -> None:
    preset = hardware.PRESETS[preset_name].gpus[0]
    gpu = detected.gpus[0]
    assert gpu.compute_capability == preset.compute_capability
    assert gpu.memory_total_bytes == pytest.approx(preset.memory_total_bytes, rel=0.01)


def test_plan_gives_the_presets_verdict(
    detected: hardware.Hardware, preset_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    real = planner.plan(detected)
    preset = planner.plan(hardware.PRESETS[preset_name])
    for fit in real.profiles:
        print(f"{fit.name}: fits={fit.fits} {fit.reasons}")
    assert _verdict(real) == _verdict(preset)
    assert real.chosen == preset.chosen
    # The same through the CLI, as a script would see it.
    capsys.readouterr()
    assert main(["plan", "--json"]) == 0
    cli_real = json.loads(capsys.readouterr().out)
    assert main(["plan", "--hardware", preset_name, "--json"]) == 0
    cli_preset = json.loads(capsys.readouterr().out)
    assert cli_real["hardware"]["source"] == "detected"
    assert cli_real["chosen"] == cli_preset["chosen"]
    assert [(p["name"], p["fits"]) for p in cli_real["profiles"]] == [
        (p["name"], p["fits"]) for p in cli_preset["profiles"]
    ]


def test_print_command_requests_the_real_gpu_by_uuid(
    detected: hardware.Hardware, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", "--print-command", "fp8-tp1"]) == 0
    docker_line = capsys.readouterr().out.splitlines()[1]
    best = planner.rank_gpus(detected.gpus)[0]
    assert f"--gpus device={best.uuid}" in docker_line


def test_doctor_gives_the_presets_verdict(detected: hardware.Hardware, preset_name: str) -> None:
    settings = Settings()
    real = doctor.run_doctor(settings, hw=detected)
    preset = doctor.run_doctor(settings, hw=hardware.PRESETS[preset_name])
    for check in real.checks:
        print(f"[{check.status}] {check.name}: {check.detail}")
    assert real.check("gpu").status == "pass"
    assert detected.gpus[0].uuid in real.check("gpu").detail
    for name in ("gpu", "profile"):
        assert real.check(name).status == preset.check(name).status
