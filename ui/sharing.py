"""The sharing tab: one switch to share the model on the LAN, keys, addresses, snippets, usage.

Layout and wiring only: what each control does and what the page shows after it is
`appliance.controllers.sharing.SharingController`'s. A new key is shown once, in this page only
(it lives in this page's state, never on the server).
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from appliance.controllers.client_snippets import KEY_VAR, LANGUAGES
from appliance.controllers.fleet import HEADERS as FLEET_HEADERS
from appliance.controllers.fleet import FleetController, FleetNotice
from appliance.controllers.sharing import (
    KeyOutcome,
    Notice,
    SharingController,
    Tables,
    snippet_id,
)
from appliance.errors import ApplianceError
from appliance.gateway.sharing import Sharing
from appliance.keys import ui_lan_active
from appliance.services import Services
from ui.polling import panel, poll_while_visible

PANEL = "ss-sharing"
ADDRESS_HEADERS = ["Interface", "Address", "Base URL", "Note"]
KEY_HEADERS = ["Name", "Key", "Created", "Last used", "From", "Requests", "Prompt", "Output", ""]
RECENT_HEADERS = ["When", "From", "Key", "Request", "Status", "Tokens", "Time"]
CLIENTS_NOTE = (
    "Each snippet is for the address picked here and the model the engine serves. A key made "
    f"on this page is filled in until the page reloads; otherwise they read it from `{KEY_VAR}` "
    "(or say where it goes): keys are shown only once, when made."
)
_SHOWN_LABEL = "New API key: copy it now, it is shown only this once"
PLAIN_HTTP = (
    "**This is plain HTTP.** Keys, the owner password and chats cross the network unencrypted: "
    "share on a network you trust, or behind a VPN (WireGuard, Tailscale) or a TLS proxy. The UI "
    "can serve HTTPS itself with a certificate you provide: `step-station config set ui.tls_cert "
    "/path/cert.pem` and `ui.tls_key /path/key.pem`."
)
LOGOUT_JS = (
    "() => fetch('/logout', {method: 'POST', credentials: 'same-origin'})"
    ".finally(() => window.location.reload())"
)


def _toast(notice: Notice | None) -> None:
    if notice is None:
        return
    if notice.level == "warning":
        gr.Warning(notice.text)
    else:
        gr.Info(notice.text)


def _tables(tables: Tables) -> tuple[Any, ...]:
    """A refresh as the outputs in `refreshed` order (see build)."""
    return (
        tables.status,
        tables.addresses,
        tables.keys,
        gr.Dropdown(choices=tables.revoke_choices, value=tables.revoke_value),
        gr.Dropdown(choices=tables.base_urls, value=tables.base_url),
        tables.recent,
        gr.Markdown(tables.agent_note, visible=bool(tables.agent_note)),
        *tables.snippets,
    )


def _shown(outcome: KeyOutcome) -> tuple[Any, ...]:
    """The one-time key's box, the page's key state, then the refresh."""
    if outcome.show is None:
        box = gr.Textbox()
    else:
        box = gr.Textbox(value=outcome.key, visible=outcome.show)
    return (box, outcome.key, *_tables(outcome.tables))


def _fleet_values(fleet: FleetController) -> tuple[Any, ...]:
    return (fleet.rows(), fleet.status_text())


def _fleet_section(services: Services) -> tuple[Any, Any, Any]:
    """Other Stations served through this one by vLLM's router (docs/fleet.md)."""
    fleet = FleetController(services.store, services.gateway.fleet)
    with gr.Accordion("Fleet", open=False, elem_id="ss-fleet"):
        gr.Markdown(
            "Serve this endpoint from several Stations: vLLM's router (`vllm-router`, on this "
            "machine only) spreads requests over this Station and its members; keys, limits and "
            "usage stay here. Each member must hold this fleet's key (`step-station fleet key` "
            "here, `step-station fleet join KEY` there)."
        )
        status = gr.Markdown(fleet.status_text(), elem_id="ss-fleet-status")
        table = gr.Dataframe(
            value=fleet.rows(),
            headers=FLEET_HEADERS,
            interactive=False,
            elem_id="ss-fleet-members",
        )
        with gr.Row():
            name = gr.Textbox(label="Member name", placeholder="station-2", scale=1)
            url = gr.Textbox(label="Its API address", placeholder="http://192.168.1.20:8000")
            add = gr.Button("Add member", elem_id="ss-fleet-add")
        with gr.Row():
            pick = gr.Dropdown(fleet.names(), label="Member", elem_id="ss-fleet-pick")
            remove = gr.Button("Remove member", variant="stop", elem_id="ss-fleet-remove")
        with gr.Row():
            key = gr.Textbox(label="Join a fleet: its key", type="password")
            join = gr.Button("Join", elem_id="ss-fleet-join")

    def done(notice: FleetNotice) -> tuple[Any, ...]:
        (gr.Info if notice.ok else gr.Warning)(notice.text)
        return (*_fleet_values(fleet), gr.update(choices=fleet.names(), value=None))

    outputs = [table, status, pick]
    add.click(lambda n, u: done(fleet.add(n, u)), [name, url], outputs, show_progress="hidden")
    remove.click(lambda p: done(fleet.remove(p)), [pick], outputs, show_progress="hidden")
    join.click(lambda k: (*done(fleet.join(k)), ""), [key], [*outputs, key])
    return table, status, pick


def build(services: Services) -> None:
    """Create the tab's widgets inside the current gr.Tab and wire them to the controller."""
    sharing = Sharing(services.store, services.gateway, services.keys)
    controller = SharingController(sharing)
    names = controller.names

    with panel(PANEL):
        gr.Markdown(
            "Share Step-3.7-Flash with the laptops and tools on your network through an "
            "OpenAI-compatible endpoint, which coding agents (Claude Code, Codex) use too. Only "
            "the model's chat, completion, Responses and Messages routes are reachable and every "
            "request needs an API key; the engine, its metrics and its controls stay on this "
            "machine."
        )
        gr.Markdown(PLAIN_HTTP, elem_id="ss-plain-http")
        with gr.Row():
            share = gr.Checkbox(
                label="Share on LAN",
                value=services.settings.gateway.share_lan,
                elem_id="ss-share-switch",
                scale=1,
            )
            status = gr.Markdown(sharing.status_text(), elem_id="ss-share-status")
        addresses = gr.Dataframe(
            value=controller.address_rows(),
            headers=ADDRESS_HEADERS,
            label="Addresses of this machine",
            interactive=False,
            elem_id="ss-share-addresses",
        )
        key_state = gr.State("")
        shown = gr.Textbox(
            label=_SHOWN_LABEL,
            visible=False,
            interactive=False,
            buttons=["copy"],
            elem_id="ss-key-shown",
        )
        with gr.Accordion("API keys", open=True):
            with gr.Row():
                key_name = gr.Textbox(
                    label="Name for a new key",
                    placeholder="e.g. alice-laptop",
                    elem_id="ss-key-name",
                    scale=3,
                )
                create = gr.Button("Create key", variant="primary", elem_id="ss-key-create")
            keys_table = gr.Dataframe(
                value=sharing.keys_rows(),
                headers=KEY_HEADERS,
                interactive=False,
                elem_id="ss-keys",
            )
            with gr.Row():
                revoke_choice = gr.Dropdown(
                    choices=sharing.active_key_choices(),
                    label="Key to revoke",
                    elem_id="ss-revoke-choice",
                    scale=3,
                )
                revoke = gr.Button("Revoke", variant="stop", elem_id="ss-revoke")
        with gr.Accordion("Connect a client", open=True):
            urls = sharing.base_urls()
            base = gr.Dropdown(
                choices=urls, value=urls[0], label="Address to use", elem_id="ss-base-url"
            )
            gr.Markdown(CLIENTS_NOTE, elem_id="ss-clients-note")
            note = controller.agent_note()
            agent_note = gr.Markdown(note, visible=bool(note), elem_id="ss-agent-note")
            codes = []
            with gr.Tabs():
                for name, value in zip(names, controller.snippet_values(urls[0], ""), strict=True):
                    with gr.Tab(name):
                        codes.append(
                            gr.Code(
                                value=value,
                                label=name,
                                language=LANGUAGES.get(name, "shell"),  # type: ignore[arg-type]
                                buttons=["copy"],
                                elem_id=snippet_id(name),
                            )
                        )
        recent = gr.Dataframe(
            value=sharing.recent_rows(),
            headers=RECENT_HEADERS,
            label="Recent use (newest first)",
            interactive=False,
            elem_id="ss-recent",
        )
        with gr.Accordion("UI on LAN", open=False):
            ui_status = gr.Markdown(sharing.ui_lan_status(), elem_id="ss-ui-lan-status")
            ui_lan = gr.Checkbox(
                label="Open this UI to the LAN (owner login required)",
                value=services.settings.ui.lan,
                elem_id="ss-ui-lan",
            )
            with gr.Row():
                user = gr.Textbox(label="Owner user name", elem_id="ss-ui-user")
                password = gr.Textbox(
                    label="Owner password (8+ characters; set on first use, asked again to turn "
                    "this on)",
                    type="password",
                    elem_id="ss-ui-password",
                )
            with gr.Row():
                current = gr.Textbox(
                    label="Current owner password",
                    type="password",
                    elem_id="ss-login-current",
                )
                new_user = gr.Textbox(label="New user name", elem_id="ss-login-user")
                new_password = gr.Textbox(
                    label="New password (8+ characters)",
                    type="password",
                    elem_id="ss-login-password",
                )
                change = gr.Button("Change owner login", elem_id="ss-login-change")
            logout = gr.Button(
                "Log out", visible=ui_lan_active(services.settings), elem_id="ss-logout"
            )
        fleet_table, fleet_status, fleet_pick = _fleet_section(services)
        timer = gr.Timer(5.0, active=False)

    refreshed = [status, addresses, keys_table, revoke_choice, base, recent, agent_note, *codes]

    def on_share(on: bool, base_url: str, key: str) -> tuple[Any, ...]:
        switch, outcome = controller.share(on, base_url, key)
        _toast(switch.notice)
        return (switch.on, *_shown(outcome))

    share.input(
        on_share,
        [share, base, key_state],
        [share, shown, key_state, *refreshed],
        show_progress="hidden",
    )

    def on_create(name: str, base_url: str) -> tuple[Any, ...]:
        try:
            outcome = controller.create_key(name, base_url)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        return ("", *_shown(outcome))

    create.click(
        on_create,
        [key_name, base],
        [key_name, shown, key_state, *refreshed],
        show_progress="hidden",
    )
    key_name.submit(
        on_create,
        [key_name, base],
        [key_name, shown, key_state, *refreshed],
        show_progress="hidden",
    )

    def on_revoke(choice: str | None, base_url: str, key: str) -> tuple[Any, ...]:
        try:
            outcome = controller.revoke_key(choice, base_url, key)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        _toast(outcome.notice)
        return _shown(outcome)

    revoke.click(
        on_revoke,
        [revoke_choice, base, key_state],
        [shown, key_state, *refreshed],
        show_progress="hidden",
    )

    base.input(controller.snippet_values, [base, key_state], codes, show_progress="hidden")

    def on_ui_lan(on: bool, name: str, secret: str) -> tuple[Any, ...]:
        switch = controller.set_ui_lan(on, name, secret)
        _toast(switch.notice)
        return (switch.on, switch.status, "")

    ui_lan.input(on_ui_lan, [ui_lan, user, password], [ui_lan, ui_status, password])

    def on_change_login(old: str, name: str, secret: str) -> tuple[Any, ...]:
        _toast(controller.change_login(old, name, secret))
        return ("", "", sharing.ui_lan_status())

    change.click(
        on_change_login,
        [current, new_user, new_password],
        [current, new_password, ui_status],
        show_progress="hidden",
    )
    # Logout is a POST (appliance/login_guard.py refuses GET /logout): then the login page.
    logout.click(None, None, None, js=LOGOUT_JS)

    def refresh(base_url: str, key: str, choice: str | None) -> tuple[Any, ...]:
        return _tables(controller.tables(base_url, key, choice))

    inputs = [base, key_state, revoke_choice]
    timer.tick(refresh, inputs, refreshed, show_progress="hidden")
    fleet = FleetController(services.store, services.gateway.fleet)
    timer.tick(
        lambda: _fleet_values(fleet), None, [fleet_table, fleet_status], show_progress="hidden"
    )
    fleet_pick.focus(lambda: gr.update(choices=fleet.names()), None, fleet_pick)
    poll_while_visible(PANEL, [timer], refresh, inputs, refreshed)
