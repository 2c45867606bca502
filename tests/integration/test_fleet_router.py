"""A fleet on loopback (tests/fixtures/fleet_kit.py): a front appliance (`up --demo`), vllm-router
supervised by it, and two member Stations (each the gateway, `python -m appliance.gateway`, in
front of a simulator) holding the front's fleet key. Requests go through the front's gateway with
the openai SDK.

What each engine served is read from its own access log (the simulator logs every request), so
a test sees where the router sent requests, not what the router says it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
from fixtures.appliance import appliance
from fixtures.fleet_kit import (
    KEY,
    ask,
    client,
    fleet,
    healthy_count,
    kill_mid_load,
    member_state,
    needs_router,
    own_served,
    status,
    view,
    wait_for,
)

from appliance.fleet import members as fm

__all__ = ["appliance", "fleet"]  # fixtures
pytestmark = needs_router


def test_requests_spread_over_members_and_a_shared_prefix_sticks(fleet: Any) -> None:
    app, members = fleet("cache_aware")
    c = client(app)
    before = [m.served() for m in members]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: ask(c, f"question {i}: {os.urandom(8).hex()} " * 20), range(40)))
    spread = [m.served() - b for m, b in zip(members, before, strict=True)]
    assert all(n > 0 for n in spread), f"each member served some of 40 distinct prompts: {spread}"
    # Prompts sharing a long prefix: cache-aware routing keeps them on one engine.
    prefix = "You are reviewing the following contract. " + os.urandom(64).hex() * 40
    before = [m.served() for m in members] + [own_served(app)]
    for i in range(12):
        ask(c, f"{prefix} Question {i}?")
    after = [m.served() for m in members] + [own_served(app)]
    moved = [a - b for a, b in zip(after, before, strict=True)]
    # Round robin or random would put about 4 on each; one health-check blip on this shared
    # machine may move the prefix once, so "nearly all" is the claim.
    assert sorted(moved)[-1] >= 10, f"the shared-prefix prompts stay on one engine: {moved}"


def test_a_killed_member_is_routed_around_and_returns(fleet: Any) -> None:
    app, (m1, m2) = fleet("round_robin")
    c = client(app)
    errors = kill_mid_load(c, m1, workers=4, before=20, after=40, served_first=5)
    # Non-streamed requests were on m1 when it died at most (4 workers, 4 in flight).
    assert len(errors) <= 4, errors
    wait_for("m1 shown failed", lambda: member_state(app, "m1") == "failed")
    before = m2.served()
    for i in range(6):
        ask(c, f"after {i}")
    assert m2.served() > before, "the other member keeps serving"
    m1.start()  # the same member comes back on its address
    before = m1.served()

    def serving_again() -> bool:
        ask(c, "back?")
        return m1.served() > before and member_state(app, "m1") == "healthy"

    wait_for("m1 takes load again and is shown healthy", serving_again)


def test_member_serves_only_the_fleet_key_and_the_router_stays_on_loopback(fleet: Any) -> None:
    app, (m1, _) = fleet("round_robin")
    body = json.dumps(
        {"model": "step3p7-flash", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()

    def post(headers: dict[str, str]) -> int:
        request = urllib.request.Request(
            f"{m1.url}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(request, timeout=10):
                return 200
        except urllib.error.HTTPError as err:
            return err.code

    assert post({}) == 401
    assert post({"Authorization": "Bearer " + fm.KEY_PREFIX + "x" * 32}) == 401
    assert post({"Authorization": "Bearer " + KEY[:-1]}) == 401
    assert post({"Authorization": f"Bearer {KEY}"}) == 200
    # The member's engine itself is not the door: the simulator listens on loopback only here,
    # and on the Station the engine is a Unix socket (docs/fleet.md).
    # The router: loopback only, on the port in its command line.
    log = (app.home / "cache" / "logs" / "fleet-router.log").read_text()
    argv = log.splitlines()[0].split()
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    port = int(argv[argv.index("--port") + 1])
    listening = {
        c.laddr.ip
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == "LISTEN"
    }
    assert listening == {"127.0.0.1"}, listening
    # A Station outside any fleet does not answer /health (the allowlist is unchanged).
    (m1.home / "data" / "fleet.key").unlink()
    wait_for("m1 forgets the fleet key", lambda: status(f"{m1.url}/health") == 404, timeout=10)
    assert post({"Authorization": f"Bearer {KEY}"}) == 401


def test_fleet_verbs_drive_the_running_front(fleet: Any) -> None:  # noqa: ANN401
    app, (_, m2) = fleet("round_robin")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance", "fleet", *args],
            env=app.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    # Each member's own report (its gateway's /fleet/load): its engine's queue and KV cache.
    wait_for(
        "both members' KV-cache use in the view",
        lambda: all(m["kv_cache_pct"] is not None for m in view(app).get("members", [])),
    )
    listed = json.loads(cli("list", "--json").stdout)
    assert listed["router"] == "running"
    assert {m["name"]: m["state"] for m in listed["members"]} == {"m1": "healthy", "m2": "healthy"}
    assert all(isinstance(m["running"], int) for m in listed["members"]), listed
    table = cli("list").stdout
    assert "KV CACHE" in table
    assert table.count(" %") == 2, table
    removed = cli("remove", "m2")
    assert removed.returncode == 0, removed.stderr
    assert "routes by it now" in removed.stdout  # through the service's control socket
    wait_for(
        "m2 out of the router", lambda: member_state(app, "m2") == "" and healthy_count(app) == 1
    )
    before = m2.served()
    for i in range(6):
        ask(client(app), f"without m2 {i}")
    assert m2.served() == before
    bad = cli("add", "m3", "https://example.invalid")
    assert bad.returncode != 0
    assert "http://HOST:PORT" in bad.stderr
    again = cli("add", "m2", m2.url)
    assert again.returncode == 0, again.stderr
    wait_for("m2 back in the router", lambda: member_state(app, "m2") == "healthy")
    assert cli("key").stdout.strip() == KEY
