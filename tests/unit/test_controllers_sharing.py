"""The sharing tab's decisions, without a browser: the switch going back when refused, the
one-time key shown and hidden, picks kept across refreshes."""

from __future__ import annotations

import pytest

from appliance.controllers import sharing as ctl
from appliance.errors import BadInputError, PortInUseError
from appliance.gateway.sharing import ShareAddress, ShareResult
from appliance.keys import KEY_PREFIX, ApiKey, NewKey

LAN, LOOP = "http://192.168.1.20:8000/v1", "http://127.0.0.1:8000/v1"


def new_key(key_id: str, name: str = "k") -> NewKey:
    record = ApiKey(id=key_id, name=name, salt="", digest="", created=0.0)
    return NewKey(record, f"{KEY_PREFIX}{key_id}{'s' * 24}")


class FakeSharing:
    """appliance.gateway.sharing.Sharing's side the tab uses (ctl.SharingActions)."""

    def __init__(self) -> None:
        self.keys = ["alice (abcdef12)"]
        self.refuse: Exception | None = None
        self.shared = False
        self.lan = False
        self.revoked: list[str] = []
        self.made = 0
        self.note = ""
        self.notes_asked = 0
        self.context = 0

    def status_text(self) -> str:
        return "shared" if self.shared else "not shared"

    def addresses(self) -> list[ShareAddress]:
        return [
            ShareAddress("eth0", "192.168.1.20", LAN, ""),
            ShareAddress("lo", "127.0.0.1", LOOP, "this machine only"),
        ]

    def base_urls(self) -> list[str]:
        return [LAN, LOOP]

    def set_shared(self, on: bool) -> ShareResult:
        if self.refuse:
            raise self.refuse
        self.shared = on
        made = new_key("0000beef") if on and not self.keys else None
        return ShareResult("on" if on else "off", made)

    def create_key(self, name: str) -> NewKey:
        if not name:
            raise BadInputError("Name the key.")
        self.made += 1
        return new_key(f"{self.made:08x}", name)

    def revoke_key(self, name_or_id: str) -> str:
        if not name_or_id:
            raise BadInputError("Choose a key to revoke.")
        self.revoked.append(name_or_id)
        return f"revoked {name_or_id}"

    def active_key_choices(self) -> list[str]:
        return list(self.keys)

    def keys_rows(self) -> list[list[str | int]]:
        return [[k] for k in self.keys]

    def recent_rows(self, limit: int = 30) -> list[list[str | int]]:
        return []

    def model_name(self) -> str:
        return "step3p7-flash"

    def agent_routes_note(self) -> str:
        self.notes_asked += 1
        return self.note

    def context_window(self) -> int:
        return self.context

    def ui_lan_status(self) -> str:
        return "ui on lan" if self.lan else "ui local"

    def set_ui_lan(self, on: bool, username: str = "", password: str = "") -> str:
        if on and password != "right":
            raise BadInputError("That is not the owner password.")
        self.lan = on
        return "done."

    def change_login(self, current: str, username: str, password: str) -> str:
        if current != "right":
            raise BadInputError("Needs the current password.")
        return "changed"


def test_switching_sharing_on_with_no_key_shows_a_new_one_in_the_snippets() -> None:
    fake = FakeSharing()
    fake.keys = []
    switch, outcome = ctl.SharingController(fake).share(True, LAN, "")
    assert switch == ctl.SwitchOutcome(True, ctl.Notice("on"))
    assert outcome.key.startswith(f"{KEY_PREFIX}0000beef")
    assert outcome.show is True
    assert all(outcome.key in s for s in outcome.tables.snippets)
    assert outcome.tables.status == "shared"


def test_a_refused_switch_goes_back_and_warns() -> None:
    fake = FakeSharing()
    fake.refuse = PortInUseError("Port 8000 is taken.")
    switch, outcome = ctl.SharingController(fake).share(True, LAN, "sk-step-kept")
    assert switch.on is False
    assert switch.notice == ctl.Notice("Port 8000 is taken.", "warning")
    assert (outcome.key, outcome.show) == ("sk-step-kept", None)  # the shown key stays


def test_switching_off_keeps_the_page_key_as_it_is() -> None:
    fake = FakeSharing()
    switch, outcome = ctl.SharingController(fake).share(False, LAN, "sk-step-kept")
    assert switch == ctl.SwitchOutcome(False, ctl.Notice("off"))
    assert (outcome.key, outcome.show) == ("sk-step-kept", None)


def test_a_created_key_is_shown_once_and_fills_the_snippets() -> None:
    outcome = ctl.SharingController(FakeSharing()).create_key("bob", LOOP)
    assert outcome.key == f"{KEY_PREFIX}00000001{'s' * 24}"
    assert outcome.show is True
    assert outcome.tables.base_url == LOOP
    # Claude Code's URL is the root (it adds /v1/messages itself); the others end in /v1.
    assert all("http://127.0.0.1:8000" in s and outcome.key in s for s in outcome.tables.snippets)


def test_a_refused_key_raises_for_the_page() -> None:
    with pytest.raises(BadInputError, match="Name the key"):
        ctl.SharingController(FakeSharing()).create_key("", LAN)


def test_revoking_the_key_this_page_shows_hides_it() -> None:
    fake = FakeSharing()
    shown = f"{KEY_PREFIX}abcdef12{'s' * 24}"
    outcome = ctl.SharingController(fake).revoke_key("alice (abcdef12)", LAN, shown)
    assert fake.revoked == ["abcdef12"]
    assert (outcome.key, outcome.show) == ("", False)
    assert outcome.notice == ctl.Notice("revoked abcdef12")
    assert all(shown not in s for s in outcome.tables.snippets)


def test_revoking_another_key_keeps_the_shown_one() -> None:
    shown = f"{KEY_PREFIX}99999999{'s' * 24}"
    outcome = ctl.SharingController(FakeSharing()).revoke_key("alice (abcdef12)", LAN, shown)
    assert (outcome.key, outcome.show) == (shown, None)


def test_revoking_with_nothing_chosen_raises() -> None:
    with pytest.raises(BadInputError, match="Choose a key"):
        ctl.SharingController(FakeSharing()).revoke_key(None, LAN, "")


def test_a_refresh_keeps_picks_that_still_exist() -> None:
    fake = FakeSharing()
    controller = ctl.SharingController(fake)
    kept = controller.tables(LOOP, "", "alice (abcdef12)")
    assert (kept.base_url, kept.revoke_value) == (LOOP, "alice (abcdef12)")
    fake.keys = []
    gone = controller.tables("http://10.9.9.9:8000/v1", "", "alice (abcdef12)")
    assert (gone.base_url, gone.revoke_value) == (LAN, None)  # first address, nothing picked
    assert gone.addresses[0] == ["eth0", "192.168.1.20", LAN, ""]


def test_ui_on_lan_needs_the_password_and_goes_back_without_it() -> None:
    controller = ctl.SharingController(FakeSharing())
    refused = controller.set_ui_lan(True, "", "wrong")
    assert refused == ctl.SwitchOutcome(
        False, ctl.Notice("That is not the owner password.", "warning"), "ui local"
    )
    done = controller.set_ui_lan(True, "", "right")
    assert done == ctl.SwitchOutcome(True, ctl.Notice("done."), "ui on lan done.")


def test_changing_the_login_warns_when_refused() -> None:
    controller = ctl.SharingController(FakeSharing())
    assert controller.change_login("wrong", "u", "p") == ctl.Notice(
        "Needs the current password.", "warning"
    )
    assert controller.change_login("right", "u", "p") == ctl.Notice("changed")


@pytest.mark.parametrize(
    ("choice", "key_id"),
    [("alice (abcdef12)", "abcdef12"), ("a (b) (0123abcd)", "0123abcd"), (None, ""), ("", "")],
)
def test_key_id_of_a_revoke_choice(choice: str | None, key_id: str) -> None:
    assert ctl.key_id_of(choice) == key_id


def test_the_engine_is_asked_its_routes_and_context_at_most_every_30_s() -> None:
    fake = FakeSharing()
    fake.note, fake.context = "The engine's vLLM is too old for Codex.", 131072
    now = [100.0]
    controller = ctl.SharingController(fake, clock=lambda: now[0])
    first = controller.tables(LAN, "")
    assert first.agent_note == "The engine's vLLM is too old for Codex."
    assert "model_context_window = 131072" in first.snippets[ctl.SNIPPET_NAMES.index("Codex")]
    now[0] += 29.0
    controller.tables(LAN, "")
    assert fake.notes_asked == 1  # the tab's 5 s refresh does not ask the engine each time
    fake.note, fake.context = "", 0  # an engine that cannot be asked now (stopped)
    now[0] += 1.0
    again = controller.tables(LAN, "")
    assert fake.notes_asked == 2
    assert again.agent_note == ""
    assert "model_context_window" not in again.snippets[ctl.SNIPPET_NAMES.index("Codex")]
    controller.tables(LAN, "")
    assert fake.notes_asked == 3  # not kept: asked again at the next refresh


def test_without_a_key_no_snippet_holds_one() -> None:
    snippets = ctl.SharingController(FakeSharing()).snippets(LAN, "")
    assert all(KEY_PREFIX + "0" not in s for s in snippets.values())
    assert all("STEP_STATION_KEY" in s for s in snippets.values())


def test_snippet_ids_are_stable() -> None:
    assert ctl.snippet_id("Python (openai SDK)") == "ss-snippet-python-openai-sdk"
