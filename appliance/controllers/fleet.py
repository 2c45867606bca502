"""The Sharing tab's Fleet section, without Gradio: members and their state, add, remove, join.

Members change through the settings store (`fleet.members`), as `step-station fleet add|remove`
does, so the gateway restarts the router at once; the state shown is the router's own (health
checks, circuit breaker, requests in flight per member: `Fleet.view()`).
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance import settings as st
from appliance.errors import ApplianceError
from appliance.fleet import members as fm
from appliance.fleet.router import Fleet, FleetView, MemberView

HEADERS = ["Member", "Address", "State", "In flight", "Routed", "Running / waiting", "KV cache"]
_ROUTER = {
    "off": "No fleet: requests go to this Station's engine.",
    "starting": "The router is starting.",
    "running": "The router is running",
    "restarting": "The router is restarting.",
    "failed": "The router failed; requests go to this Station's engine.",
}


def engine_queue(member: MemberView) -> str:
    """The member engine's own requests running / waiting (all its clients), "-" unknown."""
    if member.running is None and member.waiting is None:
        return "-"
    return f"{member.running if member.running is not None else '?'} / {member.waiting or 0}"


def kv_text(member: MemberView) -> str:
    return "-" if member.kv_cache_pct is None else f"{member.kv_cache_pct:.1f} %"


@dataclass(frozen=True)
class FleetNotice:
    ok: bool
    text: str


class FleetController:
    def __init__(self, store: st.SettingsStore, fleet: Fleet) -> None:
        self.store = store
        self.fleet = fleet

    def view(self) -> FleetView:
        return self.fleet.view()

    def rows(self) -> list[list[str]]:
        view = self.view()
        seen = {m.name: m for m in view.members}
        rows = []
        for member in fm.parse_members(self.store.current().fleet.members):
            shown = seen.get(member.name)
            if shown is None:
                rows.append([member.name, member.url, "not started", "-", "-", "-", "-"])
            else:
                rows.append(
                    [shown.name, shown.url, shown.state, str(shown.load), str(shown.routed),
                     engine_queue(shown), kv_text(shown)]
                )  # fmt: skip
        return rows

    def status_text(self) -> str:
        view = self.view()
        text = _ROUTER.get(view.router, view.router)
        if view.router == "running":
            text += f" ({view.policy}): {view.healthy_text()}."
        if view.message:
            text += f" {view.message}"
        if self.fleet.active() and view.router == "off":
            text += " This Station holds a fleet key: a front's router may send it requests."
        return text

    def _save(self, text: str) -> None:
        self.store.update({"fleet.members": text})

    def add(self, name: str, url: str) -> FleetNotice:
        try:
            text = fm.with_member(self.store.current().fleet.members, name, url)
            fm.ensure_key(self.fleet.key.path)
            self.fleet.key.reload()
            self._save(text)
        except ApplianceError as err:
            return FleetNotice(False, str(err))
        return FleetNotice(
            True,
            f"Added {name.strip()}. On it, run `step-station fleet join KEY` with the key "
            "`step-station fleet key` prints here.",
        )

    def remove(self, name: str | None) -> FleetNotice:
        if not name:
            return FleetNotice(False, "Pick the member to remove.")
        try:
            self._save(fm.without_member(self.store.current().fleet.members, name))
        except ApplianceError as err:
            return FleetNotice(False, str(err))
        return FleetNotice(True, f"Removed {name}; requests no longer go there.")

    def join(self, key: str) -> FleetNotice:
        try:
            fm.store_key(key, self.fleet.key.path)
            self.fleet.key.reload()
        except ApplianceError as err:
            return FleetNotice(False, str(err))
        return FleetNotice(True, "Joined: this Station serves requests carrying that fleet key.")

    def names(self) -> list[str]:
        return [m.name for m in fm.parse_members(self.store.current().fleet.members)]
