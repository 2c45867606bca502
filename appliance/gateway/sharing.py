"""The sharing panel's logic (no gradio): switch sharing, list addresses, keys, usage.

The clients' snippets are `appliance/controllers/client_snippets.py`'s.

`ui/sharing.py` is layout and wiring only; every button calls a method of `Sharing`.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass

import httpx
import psutil

from appliance import endpoint
from appliance import settings as st
from appliance.engine.state import EngineState
from appliance.errors import BadInputError
from appliance.gateway.apis import AGENT_ROUTES, MESSAGES, MODELS, OPENAPI_PATH, engine_paths
from appliance.gateway.service import EVERY_INTERFACE, Gateway
from appliance.keys import KeyStore, NewKey, OwnerLogin

_VIRTUAL_PREFIXES = ("docker", "br-", "veth", "virbr", "cni", "flannel", "lxc", "podman")
_VPN_PREFIXES = ("tailscale", "wg", "tun", "zt")


@dataclass(frozen=True)
class ShareAddress:
    interface: str
    address: str
    url: str
    note: str  # "LAN", "VPN", "container bridge (other machines cannot reach it)", "this machine"


def _note(interface: str, address: str) -> str:
    if ipaddress.ip_address(address).is_loopback:
        return "this machine only"
    if interface.startswith(_VIRTUAL_PREFIXES):
        return "container bridge (other machines cannot reach it)"
    if interface.startswith(_VPN_PREFIXES):
        return "VPN"
    if ipaddress.ip_address(address).is_link_local:
        return "link-local"
    return "LAN"


def share_addresses(bind: str, port: int) -> list[ShareAddress]:
    """Every IPv4 address clients could use to reach a gateway bound to `bind`, best first."""
    # Which interfaces are up is a nicety: net_if_stats() asks each one with ioctl(SIOCETHTOOL),
    # which qemu-user (arm64 emulation) answers ENOSYS and some container sandboxes refuse. Without
    # it every interface counts as up; the addresses themselves come from getifaddrs().
    try:
        stats = psutil.net_if_stats()
    except OSError:
        stats = {}
    try:
        interfaces = psutil.net_if_addrs()
    except OSError:
        interfaces = {}
    found: list[ShareAddress] = []
    for interface, addresses in interfaces.items():
        if interface in stats and not stats[interface].isup:
            continue
        for addr in addresses:
            if addr.family != socket.AF_INET:
                continue
            if bind not in (EVERY_INTERFACE, addr.address):
                continue
            found.append(
                ShareAddress(
                    interface,
                    addr.address,
                    f"http://{addr.address}:{port}/v1",
                    _note(interface, addr.address),
                )
            )
    order = {"LAN": 0, "VPN": 1, "link-local": 2, "this machine only": 4}
    found.sort(key=lambda a: (order.get(a.note, 3), a.interface, a.address))
    if not found and bind:
        found.append(ShareAddress("", bind, f"http://{bind}:{port}/v1", _note("", bind)))
    return found


# -------------------------------------------------------------------------------- controller


def _ago(at: float | None, now: float) -> str:
    if not at:
        return "never"
    seconds = max(0, int(now - at))
    if seconds < 60:
        return f"{seconds} s ago"
    if seconds < 3600:
        return f"{seconds // 60} min ago"
    if seconds < 86400:
        return f"{seconds // 3600} h ago"
    return time.strftime("%Y-%m-%d", time.localtime(at))


@dataclass(frozen=True)
class ShareResult:
    message: str
    new_key: NewKey | None = None


class Sharing:
    """What the sharing tab does, in plain Python."""

    def __init__(self, store: st.SettingsStore, gateway: Gateway, keys: KeyStore) -> None:
        self.store = store
        self.gateway = gateway
        self.keys = keys
        self.login = OwnerLogin()

    @property
    def settings(self) -> st.Settings:
        """The snapshot in force now."""
        return self.store.current()

    # ----------------------------------------------------------------------------- status

    def model_name(self) -> str:
        engine = self.gateway.gate.engine
        return engine.status().served_model_name or engine.served_model_name or "step3p7-flash"

    def status_text(self) -> str:
        gw = self.settings.gateway
        if not self.gateway.running:
            return f"The API gateway is not running (port {gw.port})."
        where = f"{self.gateway.host}:{self.gateway.port}"
        if not self.gateway.shared:
            keys = "API key required" if self.gateway.require_key else "no key needed"
            return f"Not shared: listening on {where}, this machine only ({keys})."
        count = self.keys.active_count()
        return (
            f"Shared on the LAN: listening on {where}. Every request needs an API key "
            f"({count} active). Only /v1/models, /v1/chat/completions, /v1/completions, "
            "/v1/responses and /v1/messages are reachable; the engine itself stays on loopback."
        )

    def agent_routes_note(self) -> str:
        """What the running engine lacks of the coding-agent routes, for the tab to show; ""
        when it serves both, or when it cannot be asked now (not ready, no route list)."""
        engine = self.gateway.gate.engine
        status = engine.status()
        if status.state is not EngineState.READY or not status.engine_url:
            return ""
        key = self.gateway.engine_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        url = status.engine_url.rstrip("/") + OPENAPI_PATH
        try:
            response = endpoint.request("GET", url, 3.0, headers=headers)
        except httpx.HTTPError:
            return ""
        paths = engine_paths(response.content) if response.status_code == 200 else None
        missing = [route for route in AGENT_ROUTES if paths is not None and route not in paths]
        if not missing:
            return ""
        clients = ", ".join(
            "Claude Code (POST /v1/messages)" if route == MESSAGES
            else "Codex (POST /v1/responses)"
            for route in missing
        )  # fmt: skip
        return (
            f"The engine's vLLM is too old for {clients}: the endpoint answers those routes with "
            "501. Chat clients are not affected; a newer engine image serves them."
        )

    def context_window(self) -> int:
        """The served model's context length in tokens, from the engine's own /v1/models (the
        Sharing tab tells coding agents when to compact); 0 when it cannot be asked now."""
        engine = self.gateway.gate.engine
        status = engine.status()
        if status.state is not EngineState.READY or not status.engine_url:
            return 0
        key = self.gateway.engine_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            response = endpoint.request(
                "GET", status.engine_url.rstrip("/") + MODELS, 3.0, headers=headers
            )
            models = response.json()["data"] if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return 0
        name = self.model_name()
        for entry in models if isinstance(models, list) else []:
            if isinstance(entry, dict) and entry.get("id") == name:
                length = entry.get("max_model_len")
                return length if isinstance(length, int) and length > 0 else 0
        return 0

    def addresses(self) -> list[ShareAddress]:
        bind = self.gateway.host or "127.0.0.1"
        return share_addresses(bind, self.gateway.port or self.settings.gateway.port)

    def base_urls(self) -> list[str]:
        urls = [a.url for a in self.addresses() if "cannot reach" not in a.note]
        return urls or [self.gateway.local_url]

    # ------------------------------------------------------------------------------ switch

    def set_shared(self, on: bool) -> ShareResult:
        """Switch LAN sharing; the first switch-on with no key makes one (returned, shown once)."""
        change = {"gateway.share_lan": on}
        if self.gateway.running:
            # raises (and keeps the old listener) before anything is saved
            self.gateway.apply_settings(st.with_changes(self.settings, change))
        self.store.update(change)  # saved; the service's gateway follows the store too
        if not on:
            return ShareResult("Sharing is off: the gateway listens on this machine only.")
        new_key = None
        if self.keys.active_count() == 0:
            new_key = self.keys.create(f"lan-{time.strftime('%Y%m%d-%H%M%S')}")
        message = "Sharing is on. Clients need an API key."
        if new_key is not None:
            message += " A key was made for you; copy it now, it is shown only once."
        return ShareResult(message, new_key)

    # -------------------------------------------------------------------------------- keys

    def create_key(self, name: str) -> NewKey:
        return self.keys.create(name)

    def revoke_key(self, name_or_id: str) -> str:
        if not name_or_id.strip():
            raise BadInputError("Choose a key to revoke.", hint="Pick one from the list.")
        record = self.keys.revoke(name_or_id)
        return f"Key {record.name!r} ({record.display}) is revoked; it stops working at once."

    def active_key_choices(self) -> list[str]:
        return [f"{k.name} ({k.id})" for k in self.keys.list() if k.active]

    def keys_rows(self) -> list[list[str | int]]:
        now = time.time()
        return [
            [
                k.name,
                k.display,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created)),
                _ago(k.last_used, now),
                k.last_address or "",
                k.requests,
                k.prompt_tokens,
                k.completion_tokens,
                "active" if k.active else "revoked",
            ]
            for k in reversed(self.keys.list())
        ]

    def recent_rows(self, limit: int = 30) -> list[list[str | int]]:
        now = time.time()
        return [
            [
                _ago(r.at, now),
                r.address,
                r.key_name or ("(no key)" if not r.key_id else r.key_id),
                f"{r.method} {r.path}",
                r.status,
                r.prompt_tokens + r.completion_tokens,
                f"{r.duration_ms:.0f} ms",
            ]
            for r in self.gateway.recent(limit)
        ]

    # -------------------------------------------------------------------------- UI on LAN

    def ui_lan_status(self) -> str:
        if not self.settings.ui.lan:
            if self.login.is_set():
                return (
                    f"The UI is on this machine only. An owner login ({self.login.username()!r}) "
                    "is set: turning this on asks for its password."
                )
            return "The UI is on this machine only; the owner login is set on first use."
        user = self.login.username()
        return f"UI on LAN is on, with the owner login ({user!r}); it applies from a start."

    def set_ui_lan(self, on: bool, username: str = "", password: str = "") -> str:
        """Turn "UI on LAN" on or off. On needs the owner login: set here on first use; once one
        exists, `password` must be its current password (a page or a neighbour that reaches this
        switch must not open the UI to the LAN with a login it does not know). Off needs nothing:
        it only takes the UI off the network."""
        if on and not self.login.is_set():
            if not username.strip() or not password:
                raise BadInputError(
                    "The UI on the LAN needs an owner login first.",
                    hint="Enter a user name and a password (8 characters or more), then switch "
                    "it on again.",
                )
            self.login.set(username, password)
        elif on and not self.login.check_password(password):
            raise BadInputError(
                "Turning the UI on the LAN on needs the current owner password."
                if not password
                else "That is not the owner password.",
                hint="Enter the owner password set before (the user name is not needed), then "
                "switch it on again.",
            )
        self.store.update({"ui.lan": on})
        if on:
            return (
                "UI on LAN is on: from the next start of Step Station the UI listens on the "
                f"network and every page asks for the owner login ({self.login.username()!r})."
            )
        return "UI on LAN is off: from the next start the UI listens on this machine only."

    def change_login(self, current: str, username: str, password: str) -> str:
        """Replace the owner login; needs the current password once a login exists. Every
        session signed in with the old login ends (appliance/login_guard.py)."""
        if not current and self.login.is_set():
            raise BadInputError(
                "Changing the owner login needs the current owner password.",
                hint="Enter the current password, then the new user name and password.",
            )
        self.login.set(username, password, current=current)
        return (
            f"The owner login is now {self.login.username()!r}; pages signed in with the old "
            "one must sign in again."
        )
