"""The inter-process engine lock: a second process waits, is told who holds it, and gets it as
soon as the holder dies, even by kill -9."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from appliance.engine.lock import EngineLock, lock_path
from appliance.errors import EngineError

HOLDER = textwrap.dedent(
    """
    import sys, time
    from appliance.engine.lock import EngineLock
    with EngineLock(5):
        print("held", flush=True)
        time.sleep(60)
    """
)


def test_other_process_waits_then_gets_it_after_kill_9() -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(EngineError, match=f"process {holder.pid}") as info:
            EngineLock(0.3).acquire()
        assert "step-station status" in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with EngineLock(5):  # the kernel released it with the dead process
        assert lock_path().read_text().strip().isdigit()


def test_reentrant_within_a_process() -> None:
    with EngineLock(1), EngineLock(1):
        pass
    with EngineLock(1):
        pass
