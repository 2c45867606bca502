"""The start-up timeline and the memory breakdown, from supervisor statuses and samples."""

from __future__ import annotations

import pytest

from appliance.engine import phases
from appliance.engine.state import EngineState, EngineStatus, PhaseRecord
from appliance.monitoring.sampler import GpuSample, HostSample, ProcessSample, Sample
from appliance.monitoring.timeline import (
    DOWNLOADING,
    PULLING,
    ProgressRates,
    build_timeline,
    compact_log,
    memory_breakdown,
    split_failure,
)

GB = 10**9
GIB = 1024**3


def status(state: EngineState, **kw) -> EngineStatus:
    kw.setdefault("started_at", 1000.0)
    return EngineStatus(state=state, **kw)


def test_rates_and_eta_from_progress_updates() -> None:
    now = [0.0]
    rates = ProgressRates(window_s=10, clock=lambda: now[0])
    for t, done in [(0, 0), (1, 100 * 10**6), (2, 200 * 10**6)]:
        now[0] = t
        rates.observe(status(EngineState.DOWNLOADING_WEIGHTS, progress=(done, 1000 * 10**6)))
    rate, eta = rates.estimate(DOWNLOADING)
    assert rate == pytest.approx(100e6)
    assert eta == pytest.approx(8.0)
    assert rates.estimate(PULLING) == (None, None)
    # A new start forgets the last one.
    rates.observe(status(EngineState.PULLING_IMAGE, started_at=2000.0, progress=(0, 10)))
    assert rates.totals(DOWNLOADING) is None


def test_timeline_while_downloading_shows_bytes_rate_eta_and_pending_phases() -> None:
    now = [0.0]
    rates = ProgressRates(clock=lambda: now[0])
    pull = PhaseRecord(PULLING, started_at=1000.0, elapsed_s=12.0, done=True)
    download = PhaseRecord(DOWNLOADING, started_at=1012.0, elapsed_s=30.0)
    for t, done in [(0, 1 * GB), (10, 3 * GB)]:
        now[0] = t
        rates.observe(
            status(
                EngineState.DOWNLOADING_WEIGHTS,
                progress=(done, 213 * GB),
                phases=[pull, download],
            )
        )
    s = status(
        EngineState.DOWNLOADING_WEIGHTS,
        phase=DOWNLOADING,
        phases=[pull, download],
        progress=(3 * GB, 213 * GB),
        log_tail=["Fetching 50 files"],
    )
    tl = build_timeline(s, rates, now=1042.0)
    assert tl.headline == f"Starting: {DOWNLOADING} (42 s so far)"
    names = [step.name for step in tl.steps]
    assert names == [PULLING, DOWNLOADING, *dict.fromkeys((phases.LAUNCHING, *phases.LOG_PHASES))]
    current = tl.steps[1]
    assert current.state == "active"
    # 3e9 of 213e9 bytes at 200e6 bytes/s, in binary units
    assert current.detail == "2.8 of 198.4 GiB (1%), 190.7 MiB/s, 17 min 30 s left"
    assert all(step.state == "pending" for step in tl.steps[2:])
    assert tl.last_line == "Fetching 50 files"


def test_timeline_when_ready_says_how_long_it_took() -> None:
    records = [
        PhaseRecord(name, started_at=1000.0 + i, elapsed_s=10.0 * (i + 1), done=True)
        for i, name in enumerate(phases.LOG_PHASES)
    ]
    s = status(EngineState.READY, phases=records, ready_at=1432.0)
    tl = build_timeline(s)
    assert tl.headline == "Ready in 7 min 12 s"
    assert tl.steps[-1].name == "Ready"
    assert [step.state for step in tl.steps] == ["done"] * (len(phases.LOG_PHASES) + 1)


def test_failed_timeline_has_reason_what_to_do_and_log_tail() -> None:
    s = status(
        EngineState.FAILED,
        phases=[PhaseRecord(phases.LOADING_WEIGHTS, started_at=1000.0, elapsed_s=5.0)],
        message="The engine ran out of GPU memory while starting (exit code 1). "
        "Free GPU memory used by other programs, or pick a smaller profile.",
        log_tail=["INFO loading", "torch.OutOfMemoryError: CUDA out of memory."],
    )
    tl = build_timeline(s)
    assert tl.failed
    assert tl.reason == "The engine ran out of GPU memory while starting (exit code 1)."
    assert tl.what_to_do.startswith("Free GPU memory")
    assert tl.headline.startswith("Failed: The engine ran out of GPU memory")
    assert tl.steps[0].state == "failed"
    assert tl.log_tail[-1].startswith("torch.OutOfMemoryError")


def test_split_failure_without_a_hint() -> None:
    assert split_failure("Boom") == ("Boom", "See the log below, then start again.")


def gb300(processes: tuple[ProcessSample, ...], used: int) -> Sample:
    gpu = GpuSample(
        index=0,
        name="NVIDIA GB300",
        uuid="GPU-1",
        memory_total_bytes=256_703 * 1024**2,  # as NVML reports a GB300
        memory_used_bytes=used,
        utilization_pct=0.0,
        temperature_c=40.0,
        power_w=100.0,
        power_limit_w=1400.0,
        sm_clock_mhz=1000,
        throttle_reasons=(),
        processes=processes,
    )
    host = HostSample(1.0, 1, 1, "system", None, "/w", 1)
    return Sample(at=1.0, gpus=(gpu,), host=host)


def test_memory_breakdown_of_the_engine_gpu() -> None:
    engine = ProcessSample(pid=10, memory_bytes=240 * GIB, is_engine=True)
    other = ProcessSample(pid=20, memory_bytes=2 * GIB, is_engine=False)
    used = 240 * GIB + 2 * GIB + 1 * GIB  # 1 GiB the driver keeps and no process shows
    sample = gb300((engine, other), used)
    breakdown = memory_breakdown(
        sample, {"weights_gib": 198.3, "kv_cache_gib": 32.0}, kv_usage_pct=25.0
    )
    assert breakdown is not None
    parts = {p.name: p.bytes for p in breakdown.parts}
    assert parts["Weights"] == int(198.3 * GIB)
    assert parts["KV cache in use"] == 8 * GIB
    assert parts["KV cache reserved, free"] == 24 * GIB
    assert (
        parts["Engine: activations, CUDA graphs, context"]
        == 240 * GIB - int(198.3 * GIB) - 32 * GIB
    )
    assert parts["Other processes"] == 2 * GIB
    assert parts["Driver and unlisted"] == 1 * GIB
    assert parts["Free"] == 256_703 * 1024**2 - used
    assert sum(parts.values()) == 256_703 * 1024**2


def test_memory_breakdown_without_an_engine_or_memory_reading() -> None:
    sample = gb300((), 1 * GB)
    breakdown = memory_breakdown(sample, {}, None)
    assert breakdown is not None
    assert [p.name for p in breakdown.parts] == ["Driver and unlisted", "Free"]
    assert breakdown.note
    assert memory_breakdown(None, {}, None) is None


def test_a_finished_transfer_shows_its_average_rate() -> None:
    now = [0.0]
    rates = ProgressRates(clock=lambda: now[0])
    pull = PhaseRecord(PULLING, started_at=1000.0, elapsed_s=4.0, done=True)
    rates.observe(status(EngineState.PULLING_IMAGE, progress=(0, 24 * 10**6)))
    rates.observe(status(EngineState.PULLING_IMAGE, progress=(24 * 10**6, 24 * 10**6)))
    tl = build_timeline(status(EngineState.STARTING, phases=[pull]), rates, now=1010.0)
    assert tl.steps[0].detail == "22.9 of 22.9 MiB (100%), 5.7 MiB/s on average"


def test_progress_bar_redraws_collapse_to_their_last_state() -> None:
    lines = [
        "INFO Starting to load model",
        "Loading safetensors checkpoint shards:   2% Completed | 1/50 [00:01<00:49]",
        "Loading safetensors checkpoint shards:  50% Completed | 25/50 [00:25<00:25]",
        "Loading safetensors checkpoint shards: 100% Completed | 50/50 [00:50<00:00]",
        "INFO Loading weights took 50.1 seconds",
        "Capturing CUDA graphs (decode, FULL):  14%|#    | 5/35",
        "Capturing CUDA graphs (decode, FULL): 100%|#####| 35/35",
        "torch.OutOfMemoryError: CUDA out of memory.",
    ]
    assert compact_log(lines) == [lines[0], lines[3], lines[4], lines[6], lines[7]]
