"""A fleet whose members are real vLLM engines (the session's two CPU engines, tiny-std and
tiny-step3p7, tests/fixtures/realvllm.py), each behind its own member gateway holding the front's
fleet key, as tests/integration/test_fleet_router.py does with simulators. The front's own engine
(the demo's simulator) is the router's third worker. What each engine served is its own
`vllm:request_success_total`, not what the router says it did.
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

import pytest
from fixtures.appliance import appliance
from fixtures.fleet_kit import (
    KEY,
    VllmEngine,
    ask,
    client,
    fleet,
    healthy_count,
    kill_mid_load,
    member_state,
    needs_router,
    own_served,
    view,
    wait_for,
)

__all__ = ["appliance", "fleet"]  # fixtures
pytestmark = [needs_router, pytest.mark.timeout(900)]


def test_real_vllm_members_share_load_keep_a_prefix_and_survive_a_kill(
    fleet: Any, request: pytest.FixtureRequest
) -> None:
    std = request.getfixturevalue("real_vllm_std")
    step = request.getfixturevalue("real_vllm_step")
    app, (m1, m2) = fleet("cache_aware", engines=[VllmEngine(std.url), VllmEngine(step.url)])
    c = client(app)

    # The front shows each member's real engine: its queue and KV-cache use (vLLM's gauges).
    wait_for(
        "both members' KV-cache use in the view",
        lambda: all(
            isinstance(m["kv_cache_pct"], float) and isinstance(m["running"], int)
            for m in view(app).get("members", [])
        ),
    )

    def counts() -> list[int]:
        return [m1.served(), m2.served(), own_served(app)]

    # Distinct prompts: the router spreads them over both real engines (and the front's own).
    before = counts()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: ask(c, f"topic {i} {os.urandom(6).hex()} " * 8), range(12)))
    spread = [a - b for a, b in zip(counts(), before, strict=True)]
    assert min(spread[:2]) > 0, f"each real engine served some of 12: {spread}"
    assert sum(spread) == 12, spread

    # Prompts sharing a long prefix stay on one engine (cache-aware routing).
    prefix = "Summarise this log. " + " ".join(os.urandom(4).hex() for _ in range(120))
    before = counts()
    for i in range(6):
        ask(c, f"{prefix} Part {i}?")
    moved = [a - b for a, b in zip(counts(), before, strict=True)]
    assert max(moved) >= 5, f"the shared-prefix prompts stay on one engine: {moved}"

    # The member's door takes only the fleet key, with a real engine behind it.
    body = json.dumps(
        {"model": "step3p7-flash", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ).encode()
    for headers, expected in (({}, 401), ({"Authorization": f"Bearer {KEY}"}, 200)):
        req = urllib.request.Request(
            f"{m1.url}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                got = response.status
        except urllib.error.HTTPError as err:
            got = err.code
        assert got == expected, (headers.keys(), got)

    # The policy changes through the running service (`config set`); the router restarts with it.
    # Round robin for the rest: with cache-aware routing a returning member gets requests only
    # when the others are busier or its prefixes match, which says nothing about its return.
    switched = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "set", "fleet.policy", "round_robin"],
        env=app.env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert switched.returncode == 0, switched.stderr
    wait_for(
        "the router running round robin",
        lambda: (
            view(app).get("policy") == "round_robin"
            and view(app).get("router") == "running"
            and healthy_count(app) == 2
        ),
    )

    # kill -9 of a member mid-load: at most the requests in flight on it fail, the rest go on
    # the other engines, the front shows it failed, and it takes load again when it returns.
    errors = kill_mid_load(c, m1, workers=3, before=6, after=10, served_first=2, timeout=120)
    assert len(errors) <= 3, errors  # 3 workers: 3 in flight at most when m1 died
    wait_for("m1 shown failed", lambda: member_state(app, "m1") == "failed")
    before = counts()
    for i in range(3):
        ask(c, f"after {i}")
    after = counts()
    assert after[0] == before[0], "nothing goes to the dead member"
    assert sum(after) - sum(before) == 3, (before, after)
    m1.start()
    before1 = m1.served()

    def serving_again() -> bool:
        ask(c, f"back? {os.urandom(4).hex()}")
        return m1.served() > before1 and member_state(app, "m1") == "healthy"

    wait_for("m1 takes load again and is shown healthy", serving_again, timeout=120)
