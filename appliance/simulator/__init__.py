"""A standard-library-only stand-in for `vllm serve` (tests and demo mode).

`python -m appliance.simulator MODEL [vllm serve flags]` behaves like `vllm serve` in everything the
appliance relies on (the project's reference/vllm.md). Knobs come from
the environment (`STEP_SIM_*`, see `knobs.py`), so any client, Docker included, can drive it.
"""

from __future__ import annotations

# The release the simulator imitates: the vllm-openai:stepfun37 image is a 0.22/0.23 nightly
# (step3p7.py first ships in 0.23.0), so where vLLM versions differ the simulator answers as 0.23.0
# does (its source), and the conformance suite checks real vLLM 0.32 against the same tests.
VLLM_VERSION = "0.23.0"
