"""The dashboard's decisions, without a browser: redraw only on a new sample, the cards' numbers,
the memory breakdown from the engine's sizes, plots hidden while they have no data."""

from __future__ import annotations

import itertools
from typing import Any

from appliance.controllers import dashboard as ctl
from appliance.monitoring.metrics import EngineMetrics
from appliance.monitoring.sampler import GpuSample, HostSample, ProcessSample, Sample
from appliance.units import fmt_bytes

GIB = 1024**3
HOST = HostSample(12.0, 64 * GIB, 16 * GIB, "system", None, "/weights", 500 * 10**9)


def gpu(used: int, engine_bytes: int = 0) -> GpuSample:
    procs = (
        (ProcessSample(4242, engine_bytes, True, "Step-3.7-Flash engine"),) if engine_bytes else ()
    )
    return GpuSample(
        0, "GB300 <x>", "GPU-1", 100 * GIB, used, 55.0, 60.0, 300.0, 1000.0, 1800, (), procs
    )


def sample(at: float, *, gpus: tuple[GpuSample, ...] = (), engine: Any = None) -> Sample:
    return Sample(at=at, gpus=gpus, host=HOST, engine_state="ready", engine=engine)


class FakeSampler:
    """The sampler's read side (ctl.SampleSource): a fixed ring buffer."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples
        self.readers: list[str] = []

    def latest(self, reader: str = "") -> Sample | None:
        self.readers.append(reader)
        return self.samples[-1] if self.samples else None

    def history(self, seconds: float | None = None, reader: str = "") -> list[Sample]:
        self.readers.append(reader)
        return list(self.samples)


def test_values_wait_for_the_first_sample_and_skip_one_already_shown() -> None:
    sampler = FakeSampler([])
    controller = ctl.DashboardController(sampler, dict)
    assert controller.values(0.0) is None
    sampler.samples.append(sample(10.0, gpus=(gpu(40 * GIB),)))
    shown = controller.values(0.0)
    assert shown is not None
    assert shown.at == 10.0
    assert controller.values(10.0) is None  # the page already shows this one
    assert set(sampler.readers) == {ctl.READER}


def test_cards_show_the_gpu_host_and_engine_numbers_escaped() -> None:
    engine = EngineMetrics(at=1.0, running=3, waiting=1, kv_cache_usage_pct=12.5, ttft_median_s=0.2)
    page = ctl.current_html(sample(1.0, gpus=(gpu(40 * GIB),), engine=engine))
    assert 'data-gpu="0"' in page
    assert "GB300 &lt;x&gt;" in page
    memory = f"{fmt_bytes(40 * GIB)} of {fmt_bytes(100 * GIB)}"
    assert f'<td data-field="memory">{memory}</td>' in page
    assert '<td data-field="requests-running">3</td>' in page
    assert '<td data-field="kv-cache-usage">12.5 %</td>' in page
    assert '<td data-field="time-to-first-token">200 ms</td>' in page
    assert "Free disk for weights" in page


def test_no_gpu_and_no_engine_say_why() -> None:
    bare = Sample(at=1.0, gpus=(), host=HOST, engine_state="pulling_image", gpu_error="no driver")
    page = ctl.current_html(bare)
    assert "No GPU readings: no driver." in page
    assert "(now: pulling image)" in page
    assert ctl.current_html(None) == '<p class="ss-muted">Waiting for the first reading…</p>'


def test_the_breakdown_uses_the_engines_weights_and_kv_pool() -> None:
    sampler = FakeSampler([sample(5.0, gpus=(gpu(90 * GIB, engine_bytes=80 * GIB),))])
    effective = {"weights_gib": 50, "kv_cache_gib": 20}
    values = ctl.DashboardController(sampler, lambda: effective).values(0.0)
    assert values is not None
    assert 'data-part="Weights"' in values.breakdown
    assert 'data-part="KV cache reserved, free"' in values.breakdown
    weights = 'data-part="Weights"><span class="ss-swatch" style="background:#6366f1"></span>'
    assert f'{weights}Weights: <span class="ss-strong">{fmt_bytes(50 * GIB)}</span>' in (
        values.breakdown
    )
    empty = ctl.DashboardController(FakeSampler([sample(5.0)]), dict).values(0.0)
    assert empty is not None
    assert "No GPU memory reading to break down." in empty.breakdown


def test_plots_carry_each_series_and_hide_while_empty() -> None:
    engine = EngineMetrics(at=1.0, generation_tokens_per_s=40.0, prompt_tokens_per_s=None)
    samples = [
        sample(1.0, gpus=(gpu(2 * 2**30),)),
        sample(2.0, gpus=(gpu(3 * 2**30),), engine=engine),
    ]
    plots = {p.key: p for p in ctl.DashboardController(FakeSampler(samples), dict).plots()}
    assert list(plots) == [key for key, _ in ctl.PLOTS]
    assert plots["memory"].frame["value"].tolist() == [2.0, 3.0]  # GiB, as the cards above say
    assert dict(ctl.PLOTS)["memory"] == "GPU memory used (GiB)"
    assert set(plots["memory"].frame["series"]) == {"GPU 0"}
    assert plots["tokens"].frame["series"].tolist() == ["generation"]
    assert plots["memory"].visible
    assert not plots["kv"].visible  # no KV reading yet: hidden, not drawn empty


def test_a_full_history_is_averaged_into_at_most_plot_points_per_series() -> None:
    """15 minutes of 1 s samples (900) become at most PLOT_POINTS points per series, each the mean
    of its consecutive samples at the last one's time; a reading missing in part of a chunk is
    averaged over the samples that have it."""
    samples = [
        sample(
            1000.0 + i,
            gpus=(gpu(i * GIB),),
            engine=EngineMetrics(
                at=1000.0 + i, generation_tokens_per_s=float(i) if i % 2 else None
            ),
        )
        for i in range(900)
    ]
    frames = ctl.plot_frames(samples)
    memory = frames["memory"]
    assert len(memory) == ctl.PLOT_POINTS == 180  # 5 samples a point
    assert memory["value"].tolist()[:2] == [2.0, 7.0]  # mean of 0..4 GiB, of 5..9 GiB
    assert memory["time"].iloc[-1].timestamp() == 1899.0  # the last sample's time
    tokens = frames["tokens"]["value"].tolist()
    assert tokens[:2] == [2.0, 7.0]  # mean of the odd ones only: (1 + 3) / 2, (5 + 7 + 9) / 3
    # A short history is drawn as it is.
    assert ctl.plot_frames(samples[:30])["memory"]["value"].tolist() == list(range(30))


def test_pages_asking_about_the_same_sample_share_one_rendering() -> None:
    """Every open dashboard's stream asks for the values of each sample, every page's timer for
    the plots: the HTML and the frames are made once per sample (and settings), not per page."""
    samples = [sample(1.0, gpus=(gpu(2 * GIB),)), sample(2.0, gpus=(gpu(3 * GIB),))]
    effective = {"kv_cache_gib": 10.0}
    source = FakeSampler(samples)
    controller = ctl.DashboardController(source, lambda: dict(effective))
    first = controller.values(0.0)
    assert first is not None
    assert controller.values(0.0) is first  # a second page, same sample: the same rendering
    assert controller.plots() is controller.plots()
    effective["kv_cache_gib"] = 20.0  # the settings changed: made again
    again = controller.values(0.0)
    assert again is not None
    assert again is not first
    plots = controller.plots()
    samples.append(sample(3.0, gpus=(gpu(4 * GIB),)))  # a new sample: new values and frames
    newer = controller.values(0.0)
    assert newer is not None
    assert newer.at == 3.0
    assert controller.plots() is not plots
    assert controller.plots()[0].frame["value"].tolist() == [2.0, 3.0, 4.0]


def test_the_fleet_card_shows_each_member_and_nothing_without_a_fleet() -> None:
    from appliance.fleet.router import FleetView, MemberView

    members = (
        MemberView("m1", "http://10.0.0.2:8000", "failed"),
        MemberView("m<2>", "http://10.0.0.3:8000", "healthy", 3, 40, 2, 1, 37.5),
    )
    view = FleetView("running", "cache_aware", members)
    controller = ctl.DashboardController(FakeSampler([]), dict, fleet=lambda: view)
    card = controller.fleet_html()
    assert "1 of 2 members healthy" in card
    assert 'data-member="m1" data-state="failed"' in card
    assert 'data-member="m&lt;2&gt;" data-state="healthy"' in card  # names are escaped
    assert "<td>2 / 1</td><td>37.5 %</td>" in card
    assert ctl.DashboardController(FakeSampler([]), dict).fleet_html() == ""
    off = ctl.DashboardController(FakeSampler([]), dict, fleet=lambda: FleetView("off"))
    assert off.fleet_html() == ""


def test_the_pushed_plots_are_svg_with_each_series_and_leave_out_empty_ones() -> None:
    """The plots the live stream carries (plot_svg.py): one SVG per plot with data, one line per
    series carrying its newest value, a legend only where there are several series; a plot with
    no data is not drawn at all."""
    samples = [
        sample(
            1000.0 + i,
            gpus=(gpu((2 + i) * GIB),),
            engine=EngineMetrics(
                at=1000.0 + i, generation_tokens_per_s=10.0 * i, prompt_tokens_per_s=5.0
            ),
        )
        for i in range(60)
    ]
    page = ctl.plots_html(samples)
    assert page.count("<svg") == 4  # memory, utilization, power, tokens; no KV reading: no plot
    assert 'id="ss-plot-memory"' in page
    assert 'id="ss-plot-kv"' not in page
    assert 'data-series="GPU 0" data-points="60" data-last="61"' in page  # GiB, the newest
    assert 'data-series="generation" data-points="60" data-last="590"' in page
    assert 'data-series="prompt"' in page
    tokens = page[page.index('id="ss-plot-tokens"') :]
    assert "ss-legend" in tokens  # two series: a legend
    memory = page[page.index('id="ss-plot-memory"') : page.index('id="ss-plot-utilization"')]
    assert "ss-legend" not in memory  # one series: none
    assert ctl.plots_html([]).count("<svg") == 0  # before any reading: a line of text, no plot
    odd = EngineMetrics(at=1.0, generation_tokens_per_s=float("nan"), kv_cache_usage_pct=1.0)
    drawn = ctl.plots_html([sample(1.0, engine=odd), sample(2.0, engine=odd)])
    assert "nan" not in drawn.lower()  # a NaN reading is left out, not drawn
    assert 'id="ss-plot-tokens"' not in drawn
    assert 'id="ss-plot-kv"' in drawn


def test_plot_axes_have_round_ticks_covering_the_data() -> None:
    ticks = ctl.plot_svg.nice_ticks(0.0, 61.0)
    assert ticks[0] == 0.0
    assert ticks[-1] >= 61.0
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1  # evenly spaced
    assert steps.pop() in (10.0, 20.0, 25.0)  # 1, 2, 2.5 or 5 times a power of ten
    assert 3 <= len(ticks) <= 6
    flat = ctl.plot_svg.nice_ticks(5.0, 5.0)  # a flat line still has an axis around it
    assert flat[0] <= 5.0 < flat[-1]
    times = ctl.plot_svg.time_ticks(1000.0, 1900.0)  # 15 minutes
    assert 2 <= len(times) <= 5
    assert all(t % 60 == 0 and 1000.0 <= t <= 1900.0 for t in times)  # on whole minutes
    # Markup in a series name is escaped, never live.
    escaped = ctl.plot_svg.line_plot("x", "<b>t</b>", {"<i>s</i>": [(1.0, 1.0), (2.0, 2.0)]})
    assert "<i>" not in escaped
    assert "<b>" not in escaped


def test_pushed_plots_are_drawn_once_per_five_seconds_of_samples_for_all_pages() -> None:
    """Every open page's stream asks at each new sample; the plots are redrawn only when the
    newest sample is PLOT_EVERY_S newer than the last drawing, and every page gets that one."""
    samples = [sample(1.0, gpus=(gpu(2 * GIB),))]
    source = FakeSampler(samples)
    controller = ctl.DashboardController(source, dict)
    assert ctl.DashboardController(FakeSampler([]), dict).plots_html() is None
    first = controller.plots_html()
    assert first is not None
    assert first[0] == 1.0
    assert controller.plots_html() is first  # another page, same moment: the same drawing
    for at in (2.0, 3.0, 4.0, 5.0):  # newer samples within 5 s: still that drawing
        samples.append(sample(at, gpus=(gpu(2 * GIB),)))
        assert controller.plots_html() is first
    samples.append(sample(6.0, gpus=(gpu(9 * GIB),)))
    redrawn = controller.plots_html()
    assert redrawn is not None
    assert redrawn[0] == 6.0
    assert 'data-points="6" data-last="9"' in redrawn[1]
