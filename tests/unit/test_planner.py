"""Fit planner: numbers against values worked out by hand, reasons in plain words, the choice."""

from __future__ import annotations

import dataclasses
import json

import pytest

from appliance import hardware, planner
from appliance.cli import main
from appliance.hardware import GIB, MIB, GpuInfo, Hardware
from appliance.profiles import Profile, get_profile
from appliance.settings import EngineSettings

GB300 = hardware.PRESETS["gb300"]
H200 = hardware.PRESETS["h200"]


def test_kv_cache_constants_from_the_model_shape() -> None:
    # 8 KV heads x 128 dims x 2 (K and V) x 1 byte (FP8 KV) = 2,048 bytes per token per layer;
    # 12 full-attention layers: 24,576 bytes (24 KiB) per token.
    fp8 = hardware_profile("fp8-tp1")
    assert planner.kv_bytes_per_token(fp8, mtp=False) == 12 * 2_048 == 24 * 1024
    # MTP adds its 3 layers: 15 x 2,048 = 30,720.
    assert planner.kv_bytes_per_token(fp8, mtp=True) == 30_720
    # 33 sliding layers x 512-token window x 2,048 bytes = 34,603,008 (~34 MB) per request.
    assert planner.sliding_bytes_per_request(fp8) == 33 * 512 * 2_048 == 34_603_008
    # BF16 KV (the TP8 commands set no --kv-cache-dtype): twice as much.
    assert planner.kv_bytes_per_token(hardware_profile("fp8-tp8"), mtp=True) == 61_440
    # One 256K context with FP8 KV: 262,144 x 24 KiB = 6 GiB, as reference/vllm.md says.
    assert 6 * GIB == 262_144 * 24_576


def hardware_profile(name: str) -> Profile:
    return get_profile(name)


def test_gb300_fp8_numbers_by_hand() -> None:
    """GB300, fp8-tp1, default settings (MTP off, FP8 KV, 0.95 of the GPU).

    total        = 256,703 MiB x 1,048,576            = 269,172,604,928 bytes
    usable       = int(total x 0.95)                  = 255,713,974,681
    weights      = 212.5 GB                           = 212,500,000,000
    overhead     = 8 GiB                              =   8,589,934,592
    KV budget    = usable - weights - overhead        =  34,624,040,089 (34.62 GB)
    KV tokens    = budget // 24,576                   =       1,408,855
    one 256K req = 262,144 x 24,576 + 34,603,008      =   6,477,053,952
    requests     = budget // 6,477,053,952            =               5
    """
    fit = planner.plan(GB300).fit("fp8-tp1")
    assert 256_703 * MIB == 269_172_604_928
    assert int(269_172_604_928 * 0.95) == 255_713_974_681
    assert 255_713_974_681 - 212_500_000_000 - 8_589_934_592 == 34_624_040_089
    assert fit.fits
    assert fit.reasons == []
    assert fit.weights_gb == 212.5
    assert fit.kv_budget_gb == pytest.approx(34.62)
    assert fit.kv_tokens == 34_624_040_089 // 24_576 == 1_408_855
    assert fit.max_context == 262_144  # the model's own limit; the budget holds more
    assert fit.max_context_at_n == 262_144  # 4 x 6.48 GB < 34.6 GB
    assert fit.requests_at_context == 34_624_040_089 // 6_477_053_952 == 5
    assert fit.gpu_uuids == ["GPU-preset-gb300-0"]
    assert not fit.mtp


def test_gb300_fp8_with_mtp_by_hand() -> None:
    """MTP on: 30,720 bytes per token -> 34,624,040,089 // 30,720 = 1,127,084 tokens."""
    fit = planner.plan(GB300, engine_settings=EngineSettings(mtp=True)).fit("fp8-tp1")
    assert fit.mtp
    assert fit.kv_tokens == 34_624_040_089 // 30_720 == 1_127_084


def test_gb300_nvfp4_numbers_by_hand() -> None:
    """nvfp4-tp1: budget = 255,713,974,681 - 120,000,000,000 - 8,589,934,592 = 127,124,040,089;
    tokens = 127,124,040,089 // 24,576 = 5,172,690."""
    fit = planner.plan(GB300).fit("nvfp4-tp1")
    assert fit.fits
    assert fit.kv_budget_gb == pytest.approx(127.12)
    assert fit.kv_tokens == 127_124_040_089 // 24_576 == 5_172_690
    assert any("unconfirmed" in note for note in fit.notes)
    assert any("no MTP weights" in note for note in fit.notes)


def test_gb300_picks_fp8_for_mtp_and_says_why() -> None:
    result = planner.plan(GB300)
    assert result.chosen == "fp8-tp1"
    assert "MTP" in result.chosen_reason
    assert "nvfp4-tp1" in result.chosen_reason
    assert {f.name for f in result.profiles if f.fits} == {"fp8-tp1", "nvfp4-tp1"}
    tp8 = result.fit("fp8-tp8")
    assert tp8.reasons == ["needs 8 GPUs, this machine has 1"]
    assert tp8.kv_tokens is None  # numbers for GPUs that are not there would mislead


def test_h200_neither_station_profile_fits_and_why() -> None:
    result = planner.plan(H200)
    assert result.chosen is None
    fp8 = result.fit("fp8-tp1")
    assert not fp8.fits
    assert fp8.reason_codes == ["weights_exceed_memory"]
    # usable = int(150,754,820,096 x 0.95) = 143,217,079,091 < 212.5 GB of weights
    assert fp8.reasons == [
        "FP8 weights need 197.9 GiB (212.5 GB on the model card), this GPU has 140.4 GiB "
        "(133.4 GiB at 0.95 memory utilization)"
    ]
    nvfp4 = result.fit("nvfp4-tp1")
    assert nvfp4.reason_codes == ["not_blackwell"]
    assert nvfp4.reasons == [
        "NVFP4 needs a Blackwell GPU (this is an NVIDIA H200, compute capability 9.0)"
    ]
    assert result.fit("nvfp4-tp4").reason_codes == ["too_few_gpus", "not_blackwell"]


def test_8xh200_picks_fp8_tp8_numbers_by_hand() -> None:
    """fp8-tp8 on 8 x H200 (0.9: vLLM's default; BF16 KV; the seed's MTP on).

    total/GPU    = 143,771 MiB                        = 150,754,820,096
    usable/GPU   = int(total x 0.9)                   = 135,679,338,086
    weights/GPU  = 212,500,000,000 // 8               =  26,562,500,000
    budget/GPU   = usable - weights - 8 GiB           = 100,526,903,494
    budget       = x 8                                = 804,215,227,952
    per token    = 15 layers x 4,096 bytes            =          61,440
    KV tokens    = 804,215,227,952 // 61,440          =      13,089,440
    """
    result = planner.plan(hardware.PRESETS["8xh200"])
    assert result.chosen == "fp8-tp8"
    fit = result.fit("fp8-tp8")
    assert int(150_754_820_096 * 0.9) == 135_679_338_086
    assert 135_679_338_086 - 26_562_500_000 - 8_589_934_592 == 100_526_903_494
    assert fit.kv_tokens == 804_215_227_952 // 61_440 == 13_089_440
    assert fit.mtp
    assert fit.memory_utilization == 0.9
    assert len(fit.gpu_uuids) == 8
    assert result.fit("bf16-tp8").fits  # 59.4 GB per GPU fits too, with a smaller KV cache
    assert result.fit("bf16-tp8").kv_tokens < fit.kv_tokens  # type: ignore[operator]


def test_4xb200_picks_nvfp4_tp4() -> None:
    result = planner.plan(hardware.PRESETS["4xb200"])
    assert result.chosen == "nvfp4-tp4"
    assert result.fit("nvfp4-tp4").fits
    assert result.fit("fp8-tp1").reason_codes == ["weights_exceed_memory"]
    assert result.fit("fp8-tp8").reason_codes == ["too_few_gpus"]


def test_context_too_long_gives_the_max_model_len_that_fits() -> None:
    """At 0.83 the FP8 budget is int(269,172,604,928 x 0.83) - 212.5e9 - 8 GiB = 2,323,327,498
    bytes: 94,536 tokens, less than one 262,144-token request."""
    engine = EngineSettings(gpu_memory_utilization=0.83)
    fit = planner.plan(GB300, engine_settings=engine).fit("fp8-tp1")
    assert int(269_172_604_928 * 0.83) - 212_500_000_000 - 8_589_934_592 == 2_323_327_498
    assert fit.kv_tokens == 2_323_327_498 // 24_576 == 94_536
    assert not fit.fits
    assert fit.reason_codes == ["context_too_long"]
    # (2,323,327,498 - 34,603,008) // 24,576 = 93,128 -> rounded down to 1,024s: 92,160
    assert fit.max_context == 93_128
    assert "engine.max_model_len 92160" in fit.reasons[0]
    smaller = dataclasses.replace(engine, max_model_len=92_160)
    assert planner.plan(GB300, engine_settings=smaller).fit("fp8-tp1").fits


def test_max_context_at_n_concurrent() -> None:
    """budget 2,323,327,498 at 0.83; 4 requests: (budget - 4 x 34,603,008) // (4 x 24,576)."""
    engine = EngineSettings(gpu_memory_utilization=0.83, max_model_len=8_192)
    fit = planner.plan(GB300, engine_settings=engine, concurrent=4).fit("fp8-tp1")
    assert fit.n_concurrent == 4
    assert fit.max_context_at_n == (2_323_327_498 - 4 * 34_603_008) // (4 * 24_576) == 22_226
    assert fit.requests_at_context == 2_323_327_498 // (8_192 * 24_576 + 34_603_008) == 9


def test_memory_already_in_use_is_a_reason() -> None:
    gpu = dataclasses.replace(GB300.gpus[0], memory_used_bytes=40 * GIB)
    busy = dataclasses.replace(GB300, gpus=[gpu])
    fit = planner.plan(busy).fit("fp8-tp1")
    assert "memory_in_use" in fit.reason_codes
    assert fit.reasons[-1].startswith("40.0 GiB of NVIDIA GB300")


def test_configured_profile_and_gpu() -> None:
    chosen = planner.plan(GB300, engine_settings=EngineSettings(profile="nvfp4-tp1"))
    assert chosen.chosen == "nvfp4-tp1"
    refused = planner.plan(H200, engine_settings=EngineSettings(profile="fp8-tp1"))
    assert refused.chosen is None
    assert "212.5 GB" in refused.chosen_reason
    missing = planner.plan(GB300, engine_settings=EngineSettings(gpu_uuid="GPU-nope"))
    assert missing.fit("fp8-tp1").reason_codes == ["gpu_not_found"]


def test_largest_blackwell_gpu_is_ranked_first() -> None:
    rtx = GpuInfo(1, "NVIDIA RTX PRO 6000", "GPU-rtx", (12, 0), 97_887 * MIB, 0)
    h100 = GpuInfo(2, "NVIDIA H100", "GPU-h100", (9, 0), 81_559 * MIB, 0)
    gb300 = dataclasses.replace(GB300.gpus[0], index=0, uuid="GPU-gb300")
    assert [g.uuid for g in planner.rank_gpus([h100, rtx, gb300])] == [
        "GPU-gb300",
        "GPU-rtx",
        "GPU-h100",
    ]
    station = Hardware(gpus=[rtx, gb300], host=GB300.host)
    assert planner.plan(station).fit("fp8-tp1").gpu_uuids == ["GPU-gb300"]


# ---------------------------------------------------------------------------------- the CLI


def _plan_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json_shape_and_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    gb300 = _plan_json(capsys, "--hardware", "gb300")
    assert set(gb300) >= {"hardware", "chosen", "profiles"}
    assert gb300["chosen"] == "fp8-tp1"
    by_name = {p["name"]: p for p in gb300["profiles"]}
    assert list(by_name) == ["fp8-tp1", "nvfp4-tp1", "bf16-tp8", "fp8-tp8", "nvfp4-tp4"]
    for entry in gb300["profiles"]:
        assert {"name", "fits", "reasons", "weights_gb", "kv_tokens", "max_context"} <= set(entry)
    assert by_name["fp8-tp1"]["fits"]
    assert by_name["nvfp4-tp1"]["fits"]
    assert by_name["fp8-tp1"]["kv_tokens"] == 1_408_855
    assert by_name["fp8-tp1"]["max_context"] == 262_144
    assert gb300["hardware"]["gpus"][0]["name"] == "NVIDIA GB300"

    h200 = _plan_json(capsys, "--hardware", "h200")
    assert h200["chosen"] is None
    h200_by_name = {p["name"]: p for p in h200["profiles"]}
    assert not h200_by_name["fp8-tp1"]["fits"]
    assert "212.5 GB" in h200_by_name["fp8-tp1"]["reasons"][0]
    assert "Blackwell" in h200_by_name["nvfp4-tp1"]["reasons"][0]

    assert _plan_json(capsys, "--hardware", "8xh200")["chosen"] == "fp8-tp8"
    assert _plan_json(capsys, "--hardware", "4xb200")["chosen"] == "nvfp4-tp4"


def test_plan_table_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    assert "Hardware (preset h200): 1x NVIDIA H200" in out
    assert "fp8-tp1    no" in out
    assert "NVFP4 needs a Blackwell GPU" in out
    assert "Chosen: none" in out


def test_plan_on_this_machine_answers_without_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    detected = hardware.detect()
    if detected.gpus:
        pytest.skip("this machine has a GPU; tests/gpu covers it")
    result = _plan_json(capsys)
    assert result["chosen"] is None
    assert result["hardware"]["source"] == "detected"
    assert all(p["reason_codes"] == ["no_gpu"] for p in result["profiles"])


def test_plan_rejects_bad_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--hardware", "gb300", "--concurrent", "0"]) == 2
    assert "--concurrent" in capsys.readouterr().err
