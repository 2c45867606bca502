"""The one way sizes and durations are written for people."""

from __future__ import annotations

import pytest

from appliance.units import (
    NA,
    fmt_bytes,
    fmt_duration,
    fmt_latency,
    fmt_num,
    fmt_progress,
    fmt_rate,
)

KIB = 1024
MIB = 1024**2
GIB = 1024**3


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, NA),
        (float("nan"), NA),
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (KIB, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (300 * MIB, "300.0 MiB"),
        (80 * GIB, "80.0 GiB"),
        (143_771 * MIB, "140.4 GiB"),  # an H200 as NVML reports it
        (1023.96 * MIB, "1.0 GiB"),  # the unit is chosen after rounding, never "1024.0 MiB"
        (5 * 1024 * 1024 * GIB, "5.0 PiB"),
        (5000 * 1024 * 1024 * GIB, "5000.0 PiB"),  # past the last unit the number just grows
        (-2 * GIB, "-2.0 GiB"),
        (2.5 * GIB, "2.5 GiB"),
    ],
)
def test_fmt_bytes(n: float | None, text: str) -> None:
    assert fmt_bytes(n) == text


def test_fmt_bytes_digits() -> None:
    assert fmt_bytes(1.234 * GIB, digits=2) == "1.23 GiB"
    assert fmt_bytes(1.5 * GIB, digits=0) == "2 GiB"
    assert fmt_bytes(100, digits=2) == "100 B"


def test_fmt_num() -> None:
    assert fmt_num(71.4, " %") == "71 %"
    assert fmt_num(12.25, " tokens/s", 1) == "12.2 tokens/s"
    assert fmt_num(None, " W") == NA


def test_fmt_rate_and_progress() -> None:
    assert fmt_rate(12.3 * MIB) == "12.3 MiB/s"
    assert fmt_rate(None) == NA
    assert fmt_progress(2 * GIB, 8 * GIB) == "2.0 of 8.0 GiB (25%)"
    assert fmt_progress(300 * MIB, 8 * GIB) == "300.0 MiB of 8.0 GiB (4%)"
    assert fmt_progress(3 * GIB, 0) == "3.0 GiB"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, NA),
        (-3, "0 s"),
        (0, "0 s"),
        (0.4, "0 s"),
        (0.5, "1 s"),  # halves round up, not to even
        (45.4, "45 s"),
        (59.6, "1 min 00 s"),
        (185, "3 min 05 s"),
        (432, "7 min 12 s"),
        (3599.4, "59 min 59 s"),
        (3600, "1 h 00 min"),
        (3720, "1 h 02 min"),
        (3780, "1 h 03 min"),
        (3629, "1 h 00 min"),
        (3630, "1 h 01 min"),  # to the nearest minute above an hour
        (26 * 3600 + 5 * 60, "26 h 05 min"),
    ],
)
def test_fmt_duration(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, NA),
        (float("nan"), NA),
        (0.0, "0 ms"),
        (0.2, "200 ms"),
        (0.9994, "999 ms"),
        (0.9996, "1.0 s"),  # rounds to 1000 ms: written in seconds, never "1000 ms"
        (1.44, "1.4 s"),
        (12.0, "12.0 s"),
    ],
)
def test_fmt_latency(seconds: float | None, text: str) -> None:
    assert fmt_latency(seconds) == text
