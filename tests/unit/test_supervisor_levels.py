"""Sleep levels the supervisor accepts (level 2 breaks a wake-up on vLLM 0.23: see sleep())."""

from __future__ import annotations

import pytest

from appliance import settings as st
from appliance.engine import Supervisor
from appliance.engine.supervisor import replace_settings
from appliance.errors import EngineError


def test_level_two_sleep_is_refused_before_touching_the_engine() -> None:
    settings = replace_settings(st.Settings(), sleep_mode=True)
    sup = Supervisor.for_demo(settings, outside_poll_s=0)
    try:
        with pytest.raises(EngineError, match="level 2 is not supported"):
            sup.sleep(level=2)
        with pytest.raises(EngineError, match="Only a ready engine"):  # level 1 gets further
            sup.sleep(level=1)
    finally:
        sup.close()
