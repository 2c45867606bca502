"""A standard-library-only stand-in for `vllm serve` (tests and demo mode).

`python -m appliance.simulator MODEL [vllm serve flags]` behaves like `vllm serve` in everything the
appliance relies on (the project's reference/vllm.md). Knobs come from
the environment (`STEP_SIM_*`, see `knobs.py`), so any client, Docker included, can drive it.
"""

from __future__ import annotations

VLLM_VERSION = "0.16.1.dev0+stepsim"
