"""The sharing tab's logic: what the switch, the key buttons and the owner-login form do.

The actions themselves are `appliance.gateway.sharing.Sharing`'s; this module decides what the
page shows after each one. A new key is shown once, in this page only: it lives in the page's
state (`key`), never on the server, and goes into the snippets so they can be copied as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from appliance.errors import ApplianceError
from appliance.gateway.sharing import SNIPPETS, ShareAddress, ShareResult
from appliance.keys import KEY_PREFIX, NewKey

SNIPPET_NAMES = tuple(SNIPPETS)


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

    def snippets(self, base_url: str, key: str = "") -> dict[str, str]: ...

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

    # ------------------------------------------------------------------------------ showing

    def address_rows(self) -> list[list[str]]:
        return [[a.interface, a.address, a.url, a.note] for a in self.sharing.addresses()]

    def snippet_values(self, base_url: str, key: str) -> list[str]:
        """The snippets in tab order, for `base_url` (the first address when none is picked)."""
        snippets = self.sharing.snippets(base_url or self.sharing.base_urls()[0], key)
        return [snippets[name] for name in self.names]

    def tables(self, base_url: str, key: str, choice: str | None = None) -> Tables:
        """A refresh that keeps the page's picks where they still exist."""
        choices = self.sharing.active_key_choices()
        urls = self.sharing.base_urls()
        url = base_url if base_url in urls else urls[0]
        return Tables(
            status=self.sharing.status_text(),
            addresses=self.address_rows(),
            keys=self.sharing.keys_rows(),
            revoke_choices=choices,
            revoke_value=choice if choice in choices else None,
            base_urls=urls,
            base_url=url,
            recent=self.sharing.recent_rows(),
            snippets=self.snippet_values(url, key),
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
