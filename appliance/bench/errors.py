"""Errors of the benchmark and the MoE tuner, in the appliance's error tree."""

from __future__ import annotations

from appliance.errors import ApplianceError


class BenchError(ApplianceError):
    """A benchmark could not run, or its result cannot be read or kept."""

    exit_code = 12


class BenchResultError(BenchError):
    """`vllm bench serve`'s result file is missing or not what it writes."""


class BenchFailedError(BenchError):
    """The run finished but requests failed (vLLM still exits 0 when every request fails)."""


class BenchStoreError(BenchError):
    """The database of past benchmark runs cannot be opened, read or written."""


class TunedConfigError(BenchError):
    """A tuned MoE config file is not in the format vLLM reads."""
