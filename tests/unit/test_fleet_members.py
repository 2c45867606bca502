"""Fleet members and key (appliance/fleet/members.py) and the Sharing tab's Fleet controller."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from appliance import settings as st
from appliance.controllers.fleet import FleetController
from appliance.errors import SettingsError
from appliance.fleet import members as fm
from appliance.fleet.members import FleetKey
from appliance.fleet.router import Fleet, router_argv, router_binary, stop_orphan


def test_members_round_trip_and_normalise() -> None:
    text = fm.with_member("", "station-2", "http://192.168.1.20:8000/v1/")
    text = fm.with_member(text, "s3", "http://10.0.0.3:8000")
    assert text == "station-2=http://192.168.1.20:8000,s3=http://10.0.0.3:8000"
    assert [m.name for m in fm.parse_members(text)] == ["station-2", "s3"]
    assert fm.without_member(text, "station-2") == "s3=http://10.0.0.3:8000"


@pytest.mark.parametrize(
    ("name", "url", "says"),
    [
        ("Bad Name", "http://h:1", "not usable"),
        ("ok", "https://h:1", "not a Station gateway"),
        ("ok", "http://h:1/v1/chat/completions", "not a Station gateway"),
        ("ok", "http://user:pw@h:1", "user name"),
        ("ok", "ftp://h", "not a Station gateway"),
    ],
)
def test_bad_members_are_refused_with_the_fix(name: str, url: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says) as err:
        fm.with_member("", name, url)
    assert err.value.hint


def test_duplicates_and_unknown_names_are_refused() -> None:
    text = fm.with_member("", "a", "http://h:1")
    with pytest.raises(SettingsError, match="already has"):
        fm.with_member(text, "a", "http://h:2")
    with pytest.raises(SettingsError, match="already in the fleet"):
        fm.with_member(text, "b", "http://h:1")
    with pytest.raises(SettingsError, match="no member named 'c'"):
        fm.without_member(text, "c")


def test_the_key_is_private_and_only_the_key_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "data" / "fleet.key"
    key = fm.ensure_key(path)
    assert key.startswith(fm.KEY_PREFIX)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert fm.ensure_key(path) == key  # made once
    seen = FleetKey(path)
    assert seen.accepts(key)
    assert not seen.accepts(key[:-1])
    assert not seen.accepts("")
    with pytest.raises(SettingsError, match="not a fleet key"):
        fm.store_key("sk-step-abc", path)
    assert not FleetKey(tmp_path / "none").accepts("")


def test_router_listens_on_loopback_only() -> None:
    argv = router_argv("vllm-router", 1, 2, ["http://127.0.0.1:8000"], "cache_aware")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"


def test_controller_adds_removes_and_joins_through_the_store(tmp_path: Path) -> None:
    store = st.SettingsStore(st.Settings(), tmp_path / "settings.toml")
    fleet = Fleet(FleetKey(tmp_path / "fleet.key"), tmp_path / "router.log")
    heard: list[str] = []
    store.subscribe(lambda s: heard.append(s.fleet.members))
    controller = FleetController(store, fleet)
    assert controller.rows() == []
    assert "No fleet" in controller.status_text()
    assert controller.add("s2", "http://10.0.0.2:8000").ok
    assert heard == ["s2=http://10.0.0.2:8000"]
    assert controller.rows() == [["s2", "http://10.0.0.2:8000", "not started", "-", "-", "-", "-"]]
    assert st.load_settings(tmp_path / "settings.toml").settings.fleet.members == heard[0]
    bad = controller.add("s2", "http://10.0.0.3:8000")
    assert not bad.ok
    assert "already has" in bad.text
    assert controller.remove("s2").ok
    assert not controller.remove(None).ok
    assert not controller.join("nope").ok
    assert controller.join(fm.KEY_PREFIX + "k" * 30).ok
    assert fleet.active()


@pytest.mark.skipif(not router_binary(), reason="vllm-router is not installed (the dev extra)")
def test_a_router_left_by_a_killed_front_is_stopped_at_the_next_start(tmp_path: Path) -> None:
    """A front killed with -9 leaves its router (a session of its own) running; the next start
    of the Station stops that one (its pid and start time in <data>/fleet-router.pid) and only
    that one: a recycled pid that is another program is left alone."""
    settings = dataclasses.replace(
        st.Settings(),
        fleet=st.FleetSettings(members="m1=http://127.0.0.1:9"),
    )
    first = Fleet(FleetKey(tmp_path / "fleet.key"), tmp_path / "router.log")
    first.sync(settings, "http://127.0.0.1:8")
    run = first._run
    assert run is not None
    orphan = psutil.Process(run.process.pid)
    assert first.pid_path.exists()
    # The front "dies": nothing stops its router. A new run of the Station starts.
    second = Fleet(FleetKey(tmp_path / "fleet.key"), tmp_path / "router.log")
    try:
        second.sync(settings, "http://127.0.0.1:8")
        assert orphan.wait(timeout=10) is not None or not orphan.is_running()
        assert second._run is not None
        assert psutil.Process(second._run.process.pid).is_running()
    finally:
        second.close()
        first._stop_run()
    assert not second.pid_path.exists()
    # A pid file naming a process that is not a vllm-router (a recycled pid) stops nothing.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = psutil.Process(bystander.pid).create_time()
        pid_file = tmp_path / "fleet-router.pid"
        pid_file.write_text(json.dumps({"pid": bystander.pid, "started": started}))
        assert not stop_orphan(pid_file)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
