"""The Station's served model name replaced for browser tests: `STEP_TEST_SERVED_NAME=<name>` with
PYTHONPATH=<this dir>, in the `step-station up` process only (the simulator it starts gets the
name from its command line, `--served-model-name`, as vLLM does).

No setting changes the served name (each launch profile fixes it), yet the Sharing tab prints it
into snippets and pages; a name made of quotes, shell expansions and HTML shows that it stays
text there. Everything else is the real appliance.
"""

from __future__ import annotations

import dataclasses
import os
import sys

_NAME = os.environ.get("STEP_TEST_SERVED_NAME", "")
if _NAME and sys.orig_argv[1:4] == ["-m", "appliance", "up"]:
    from appliance import profiles

    for _key, _profile in list(profiles.PROFILES.items()):
        profiles.PROFILES[_key] = dataclasses.replace(_profile, served_model_name=_NAME)
    profiles.STATION_SERVED_NAME = _NAME
