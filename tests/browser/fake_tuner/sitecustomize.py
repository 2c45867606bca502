"""vLLM's MoE tuner replaced for browser tests: `STEP_FAKE_TUNER=1` (or `hold`) on
PYTHONPATH=<this dir>, in the `step-station up` process only (not the simulator it starts).

Two things cannot be real in a demo appliance here, and only they are replaced:
- the tuner needs a GPU: `control.tune_launcher_for` gives the fake of tests/fixtures/tune_kit.py
  (the one GPU seam, `TunerLauncher`), which prints the tuner's progress lines and writes a file
  in vLLM's name and format; with `hold` it stops after its first batch size until cancelled;
- the demo's engine is the simulator run as a process, which `control.tune_target` refuses (the
  pip wheel has no tuner): the engine as the tuner sees it is tune_kit's TARGET (Step-3.7's
  expert shape on a GB300, an image digest).
Everything else is the real one: the service's TuneRunner stops the demo engine through its
supervisor, merges and installs the file with its install record, and the UI reads the folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

_MODE = os.environ.get("STEP_FAKE_TUNER", "")
if _MODE and sys.orig_argv[1:4] == ["-m", "appliance", "up"]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: fixtures.tune_kit
    from fixtures.tune_kit import TARGET, FakeTuner

    from appliance import control

    _BEHAVIOUR: dict[str, Any] = {"hold": True, "hold_s": 60.0} if _MODE == "hold" else {}

    def _launcher_for(runtime: Any) -> Any:
        return lambda target: FakeTuner(**_BEHAVIOUR)

    def _target(supervisor: Any, settings: Any, gpu_name: str = "") -> Any:
        return TARGET

    control.tune_launcher_for = _launcher_for  # type: ignore[assignment]
    control.tune_target = _target  # type: ignore[assignment]
