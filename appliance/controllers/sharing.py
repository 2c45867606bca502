"""The sharing tab's logic: what the switch, the key buttons and the owner-login form do.

The actions themselves are `appliance.gateway.sharing.Sharing`'s; this module decides what the
page shows after each one. A new key is shown once, in this page only: it lives in the page's
state (`key`), never on the server, and goes into the snippets so they can be copied as they are
(`client_snippets.py`; without one they read it from $STEP_STATION_KEY).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from appliance.controllers.client_snippets import SNIPPETS, client_snippets
from appliance.errors import ApplianceError
from appliance.gateway.sharing import ShareAddress, ShareResult
from appliance.keys import KEY_PREFIX, NewKey

SNIPPET_NAMES = tuple(SNIPPETS)
# How long the engine's answers (which agent routes it serves, its context length) are reused:
# the tab refreshes every 5 s and they only change when the engine is replaced.
ENGINE_FACTS_TTL_S = 30.0


class SharingActions(Protocol):
    """What `appliance.gateway.sharing.Sharing` does for the tab."""

    def status_text(self) -> str: ...

    def addresses(self) -> list[ShareAddress]: ...

    def base_urls(self) -> list[str]: ...

    def set_shared(self, on: bool) -> ShareResult: ...

    def create_key(self, name: str) -> NewKey: ...

    def revoke_key(self, name_or_id: str) -> str: ...

    def active_key_choices(self) -> list[str]: ...

    def keys_rows(self) -> list[list[str | int]]: ...

    def recent_rows(self, limit: int = 30) -> list[list[str | int]]: ...

    def model_name(self) -> str: ...

    def agent_routes_note(self) -> str: ...

    def context_window(self) -> int: ...

    def ui_lan_status(self) -> str: ...

    def set_ui_lan(self, on: bool, username: str = "", password: str = "") -> str: ...

    def change_login(self, current: str, username: str, password: str) -> str: ...


def snippet_id(name: str) -> str:
    """The element id of a snippet's code box ("Python (openai SDK)" -> ss-snippet-python-...)."""
    return "ss-snippet-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def key_id_of(choice: str | None) -> str:
    """The key id in a revoke choice, "alice-laptop (abcdef12)" -> "abcdef12"."""
    return (choice or "").rsplit("(", 1)[-1].rstrip(")")


@dataclass(frozen=True)
class Notice:
    """A toast: `info` after an action, `warning` when it was refused (the page stays usable)."""

    text: str
    level: Literal["info", "warning"] = "info"


@dataclass(frozen=True)
class EngineFacts:
    """What the snippets need from the engine itself: the agent routes it lacks (a note, ""
    when none) and its context length in tokens (0 when it cannot be asked)."""

    agent_note: str
    context: int


@dataclass(frozen=True)
class Tables:
    """Everything the tab refreshes: status, addresses, keys, the two pickers, usage, snippets."""

    status: str
    addresses: list[list[str]]
    keys: list[list[str | int]]
    revoke_choices: list[str]
    revoke_value: str | None
    base_urls: list[str]
    base_url: str
    recent: list[list[str | int]]
    snippets: list[str]
    agent_note: str = ""


@dataclass(frozen=True)
class KeyOutcome:
    """After an action: the page's one-time key and whether its box shows (None: as it was)."""

    key: str
    show: bool | None
    tables: Tables
    notice: Notice | None = None


@dataclass(frozen=True)
class SwitchOutcome:
    """After a switch: where it stands (back where it was when refused) and what to say."""

    on: bool
    notice: Notice
    status: str = ""


@dataclass
class SharingController:
    """What the sharing tab shows and what its controls do."""

    sharing: SharingActions
    names: Sequence[str] = field(default=SNIPPET_NAMES)
    clock: Callable[[], float] = time.monotonic
    _facts: tuple[float, EngineFacts] | None = field(default=None, init=False, repr=False)

    # ------------------------------------------------------------------------------ showing

    def address_rows(self) -> list[list[str]]:
        return [[a.interface, a.address, a.url, a.note] for a in self.sharing.addresses()]

    def snippets(self, base_url: str, key: str, facts: EngineFacts | None = None) -> dict[str, str]:
        """Each client's snippet for `base_url` (the first address when none is picked), the
        page's key ("" for none: the snippets then read $STEP_STATION_KEY) and the served model
        name and context length as the running service reports them."""
        url = base_url or self.sharing.base_urls()[0]
        context = (facts or self.engine_facts()).context
        return client_snippets(url, key, self.sharing.model_name(), context)

    def snippet_values(
        self, base_url: str, key: str, facts: EngineFacts | None = None
    ) -> list[str]:
        """The snippets in tab order."""
        snippets = self.snippets(base_url, key, facts)
        return [snippets[name] for name in self.names]

    def engine_facts(self) -> EngineFacts:
        """What the engine lacks of the agent routes and its context length, asked at most
        every ENGINE_FACTS_TTL_S (each ask reads the engine's /openapi.json and /v1/models)."""
        now = self.clock()
        if self._facts is not None and now - self._facts[0] < ENGINE_FACTS_TTL_S:
            return self._facts[1]
        facts = EngineFacts(self.sharing.agent_routes_note(), self.sharing.context_window())
        # An engine that could not be asked (starting, stopped) is asked again next refresh, so
        # the note and the context show as soon as it is ready.
        self._facts = (now, facts) if facts.context else None
        return facts

    def agent_note(self) -> str:
        """What the engine lacks of the coding agents' routes ("" when it serves both)."""
        return self.engine_facts().agent_note

    def tables(self, base_url: str, key: str, choice: str | None = None) -> Tables:
        """A refresh that keeps the page's picks where they still exist."""
        choices = self.sharing.active_key_choices()
        urls = self.sharing.base_urls()
        url = base_url if base_url in urls else urls[0]
        facts = self.engine_facts()
        return Tables(
            status=self.sharing.status_text(),
            addresses=self.address_rows(),
            keys=self.sharing.keys_rows(),
            revoke_choices=choices,
            revoke_value=choice if choice in choices else None,
            base_urls=urls,
            base_url=url,
            recent=self.sharing.recent_rows(),
            snippets=self.snippet_values(url, key, facts),
            agent_note=facts.agent_note,
        )

    # ------------------------------------------------------------------------------ actions

    def share(self, on: bool, base_url: str, key: str) -> tuple[SwitchOutcome, KeyOutcome]:
        """Switch LAN sharing. Refused (a port taken, an interface gone): the switch goes back and
        the gateway keeps its old listener. The first switch-on with no key shows a new one."""
        try:
            result = self.sharing.set_shared(on)
        except ApplianceError as err:
            switch = SwitchOutcome(not on, Notice(str(err), "warning"))
            return switch, KeyOutcome(key, None, self.tables(base_url, key))
        switch = SwitchOutcome(on, Notice(result.message))
        if result.new_key is not None:
            key = result.new_key.secret
            return switch, KeyOutcome(key, True, self.tables(base_url, key))
        return switch, KeyOutcome(key, None, self.tables(base_url, key))

    def create_key(self, name: str, base_url: str) -> KeyOutcome:
        """Make a key and show it once; raises (a bad or taken name) for the page to show."""
        key = self.sharing.create_key(name).secret
        return KeyOutcome(key, True, self.tables(base_url, key))

    def revoke_key(self, choice: str | None, base_url: str, key: str) -> KeyOutcome:
        """Revoke the chosen key; the key this page shows goes away with it. Raises when none
        is chosen or it is unknown."""
        key_id = key_id_of(choice)
        notice = Notice(self.sharing.revoke_key(key_id))
        if key and key_id and key.startswith(f"{KEY_PREFIX}{key_id}"):
            return KeyOutcome("", False, self.tables(base_url, ""), notice)
        return KeyOutcome(key, None, self.tables(base_url, key), notice)

    def set_ui_lan(self, on: bool, username: str, password: str) -> SwitchOutcome:
        """Open the UI to the LAN (owner login needed) or close it; refused: switched back."""
        try:
            message = self.sharing.set_ui_lan(on, username, password)
        except ApplianceError as err:
            return SwitchOutcome(not on, Notice(str(err), "warning"), self.sharing.ui_lan_status())
        return SwitchOutcome(on, Notice(message), f"{self.sharing.ui_lan_status()} {message}")

    def change_login(self, current: str, username: str, password: str) -> Notice:
        try:
            return Notice(self.sharing.change_login(current, username, password))
        except ApplianceError as err:
            return Notice(str(err), "warning")
