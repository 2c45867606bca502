"""The Sharing tab's Fleet section in Chromium, against a fleet on loopback (tests/fixtures/
fleet_kit.py): both members shown healthy, a member killed with -9 shown failed while the other
keeps serving (on the Dashboard tab too, with each member's KV cache), and a member removed from
the page leaves the router's list."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fixtures.fleet_kit import ask, client, fleet, member_state, needs_router, wait_for
from playwright.sync_api import expect

__all__ = ["fleet"]  # the fixture (the browser conftest brings `appliance`)
pytestmark = [needs_router, pytest.mark.timeout(240)]


def _row(page: Any, name: str) -> Any:  # noqa: ANN401
    return page.locator("#ss-fleet-members").get_by_role("row", name=re.compile(f"^{name} "))


def test_fleet_section_shows_members_a_dead_one_failed_and_removes(fleet: Any, page: Any) -> None:  # noqa: ANN401
    app, (m1, m2) = fleet("round_robin")
    page.goto(app.url)
    page.get_by_role("tab", name="Sharing").click()
    page.locator("#ss-fleet").get_by_text("Fleet").first.click()
    expect(_row(page, "m1")).to_contain_text("healthy", timeout=30_000)
    expect(_row(page, "m2")).to_contain_text("healthy")
    expect(page.locator("#ss-fleet-status")).to_contain_text("2 of 2 members healthy")
    m1.kill()
    expect(_row(page, "m1")).to_contain_text("failed", timeout=30_000)
    before = m2.served()
    for i in range(4):  # round robin over the front's engine and m2
        ask(client(app), f"still there? {i}")
    assert m2.served() > before
    # The Dashboard tab shows the fleet too: each member's state, load and KV cache (pushed).
    page.get_by_role("tab", name="Dashboard").click()
    card = page.locator("#ss-dashboard-fleet")
    m1_row, m2_row = card.locator('tr[data-member="m1"]'), card.locator('tr[data-member="m2"]')
    expect(m1_row).to_have_attribute("data-state", "failed", timeout=30_000)
    expect(m2_row).to_have_attribute("data-state", "healthy")
    expect(m2_row).to_contain_text("%", timeout=30_000)  # its engine's KV-cache use
    expect(card).to_contain_text("1 of 2 members healthy")
    page.get_by_role("tab", name="Sharing").click()
    pick = page.locator("#ss-fleet-pick input")
    pick.click()
    page.get_by_role("option", name="m1").click()
    page.locator("#ss-fleet-remove").click()
    expect(_row(page, "m1")).to_have_count(0, timeout=30_000)
    wait_for("m1 out of the fleet view", lambda: member_state(app, "m1") == "")
