"""How the appliance writes sizes and durations for people: one rule each, used everywhere.

Sizes are in binary units (KiB, MiB, GiB, TiB), the units vLLM's own logs and NVML use, so a number
on the dashboard can be set beside a line in the engine log. Every size keeps the same number of
decimals whatever its unit, and the unit is picked after rounding, so 1023.96 MiB reads "1.0 GiB",
never "1024.0 MiB".
"""

from __future__ import annotations

import math

NA = "n/a"  # what a number that could not be read shows

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: int | float | None, digits: int = 1) -> str:
    """`512 B`, `1.5 KiB`, `74.5 GiB`: `n` bytes in the largest binary unit that keeps the number
    at least 1, with `digits` decimals (whole bytes have none); `n/a` for None or NaN."""
    if n is None or math.isnan(n):
        return NA
    sign = "-" if n < 0 else ""
    value = abs(float(n))
    if value < 1024:
        return f"{sign}{value:.0f} B"
    for power, unit in enumerate(_UNITS[1:], start=1):
        shown = round(value / 1024**power, digits)
        if shown < 1024 or unit == _UNITS[-1]:
            return f"{sign}{shown:.{digits}f} {unit}"
    raise AssertionError("unreachable: the last unit always returns")


def fmt_num(value: float | None, unit: str = "", digits: int = 0) -> str:
    """`71 %`, `12.5 tokens/s`: a reading with `digits` decimals and its unit; `n/a` for None."""
    if value is None:
        return NA
    return f"{value:.{digits}f}{unit}"


def fmt_rate(bytes_per_s: float | None, digits: int = 1) -> str:
    """`12.3 MiB/s`: a transfer rate in the same units as `fmt_bytes`."""
    return NA if bytes_per_s is None else fmt_bytes(bytes_per_s, digits) + "/s"


def fmt_progress(done: int, total: int) -> str:
    """`1.5 of 8.0 GiB (19%)`, or just `1.5 GiB` when the total is not known (zero or less)."""
    if total <= 0:
        return fmt_bytes(done)
    done_text, total_text = fmt_bytes(done), fmt_bytes(total)
    number, _, unit = done_text.partition(" ")
    if total_text.endswith(" " + unit):  # one unit for both reads easier: "1.5 of 8.0 GiB"
        done_text = number
    return f"{done_text} of {total_text} ({100 * done / total:.0f}%)"


def fmt_latency(seconds: float | None) -> str:
    """`420 ms`, `1.4 s`: a latency (time to first token, per-token time), in milliseconds under a
    second and in seconds with one decimal above; `n/a` for None or NaN."""
    if seconds is None or math.isnan(seconds):
        return NA
    if round(seconds * 1000) < 1000:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.1f} s"


def fmt_duration(seconds: float | None) -> str:
    """`45 s`, `3 min 05 s`, `1 h 02 min`: how long, to the second under an hour and to the
    minute above it (halves round up); `n/a` for None, zero for anything negative."""
    if seconds is None or math.isnan(seconds):
        return NA
    total = math.floor(max(0.0, seconds) + 0.5)
    if total < 60:
        return f"{total} s"
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod((total + 30) // 60, 60)
    return f"{hours} h {minutes:02d} min"
