"""The sharing tab: one switch to share the model on the LAN, keys, addresses, snippets, usage.

Layout and wiring only; every action is a method of `appliance.gateway.sharing.Sharing`. A new
key is shown once, in this page only (it lives in this page's state, never on the server), and
goes into the snippets so they can be copied as they are.
"""

from __future__ import annotations

import re
from typing import Any

import gradio as gr

from appliance.errors import ApplianceError
from appliance.gateway.sharing import SNIPPETS, Sharing
from appliance.keys import ui_lan_active
from appliance.services import Services
from ui.polling import panel, poll_while_visible

PANEL = "ss-sharing"
ADDRESS_HEADERS = ["Interface", "Address", "Base URL", "Note"]
KEY_HEADERS = ["Name", "Key", "Created", "Last used", "From", "Requests", "Prompt", "Output", ""]
RECENT_HEADERS = ["When", "From", "Key", "Request", "Status", "Tokens", "Time"]
_LANGUAGES = {"curl": "shell", "Python (openai SDK)": "python", "Open WebUI": "shell"}
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


def _ids(name: str) -> str:
    return "ss-snippet-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def build(services: Services) -> None:  # noqa: C901 - layout and handlers: issue 13 item 3
    """Create the tab's widgets inside the current gr.Tab and wire them to services."""
    sharing = Sharing(services.settings, services.gateway, services.keys)
    names = list(SNIPPETS)

    def address_rows() -> list[list[str]]:
        return [[a.interface, a.address, a.url, a.note] for a in sharing.addresses()]

    def snippet_values(base_url: str, key: str) -> list[str]:
        snippets = sharing.snippets(base_url or sharing.base_urls()[0], key)
        return [snippets[name] for name in names]

    with panel(PANEL):
        gr.Markdown(
            "Share Step-3.7-Flash with the laptops and tools on your network through an "
            "OpenAI-compatible endpoint. Only the model's chat and completion routes are reachable "
            "and every request needs an API key; the engine, its metrics and its controls stay on "
            "this machine."
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
            value=address_rows(),
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
            codes = []
            with gr.Tabs():
                for name, value in zip(names, snippet_values(urls[0], ""), strict=True):
                    with gr.Tab(name):
                        codes.append(
                            gr.Code(
                                value=value,
                                label=name,
                                language=_LANGUAGES.get(name, "yaml"),  # type: ignore[arg-type]
                                buttons=["copy"],
                                elem_id=_ids(name),
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
        timer = gr.Timer(5.0, active=False)

    def tables(base_url: str, key: str, choice: str | None = None) -> tuple[Any, ...]:
        choices = sharing.active_key_choices()
        urls = sharing.base_urls()
        url = base_url if base_url in urls else urls[0]
        return (
            sharing.status_text(),
            address_rows(),
            sharing.keys_rows(),
            gr.Dropdown(choices=choices, value=choice if choice in choices else None),
            gr.Dropdown(choices=urls, value=url),
            sharing.recent_rows(),
            *snippet_values(url, key),
        )

    refreshed = [status, addresses, keys_table, revoke_choice, base, recent, *codes]

    def on_share(on: bool, base_url: str, key: str) -> tuple[Any, ...]:
        try:
            result = sharing.set_shared(on)
        except ApplianceError as err:
            gr.Warning(str(err))
            return (not on, gr.Textbox(), key, *tables(base_url, key))
        gr.Info(result.message)
        if result.new_key is not None:
            key = result.new_key.secret
            return (on, gr.Textbox(value=key, visible=True), key, *tables(base_url, key))
        return (on, gr.Textbox(), key, *tables(base_url, key))

    share.input(
        on_share,
        [share, base, key_state],
        [share, shown, key_state, *refreshed],
        show_progress="hidden",
    )

    def on_create(name: str, base_url: str) -> tuple[Any, ...]:
        try:
            made = sharing.create_key(name)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        key = made.secret
        return ("", gr.Textbox(value=key, visible=True), key, *tables(base_url, key))

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
        key_id = (choice or "").rsplit("(", 1)[-1].rstrip(")")
        try:
            message = sharing.revoke_key(key_id)
        except ApplianceError as err:
            raise gr.Error(str(err)) from err
        gr.Info(message)
        if key and key_id and key.startswith(f"sk-step-{key_id}"):
            key = ""  # the key shown in this page is the one revoked
            return (gr.Textbox(value="", visible=False), key, *tables(base_url, key))
        return (gr.Textbox(), key, *tables(base_url, key))

    revoke.click(
        on_revoke,
        [revoke_choice, base, key_state],
        [shown, key_state, *refreshed],
        show_progress="hidden",
    )

    def on_base(base_url: str, key: str) -> list[str]:
        return snippet_values(base_url, key)

    base.input(on_base, [base, key_state], codes, show_progress="hidden")

    def on_ui_lan(on: bool, name: str, secret: str) -> tuple[Any, ...]:
        try:
            message = sharing.set_ui_lan(on, name, secret)
        except ApplianceError as err:
            gr.Warning(str(err))
            return (not on, sharing.ui_lan_status(), "")
        gr.Info(message)
        return (on, sharing.ui_lan_status() + " " + message, "")

    ui_lan.input(on_ui_lan, [ui_lan, user, password], [ui_lan, ui_status, password])

    def on_change_login(old: str, name: str, secret: str) -> tuple[Any, ...]:
        try:
            message = sharing.change_login(old, name, secret)
        except ApplianceError as err:
            gr.Warning(str(err))
            return ("", "", sharing.ui_lan_status())
        gr.Info(message)
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
        return tables(base_url, key, choice)

    inputs = [base, key_state, revoke_choice]
    timer.tick(refresh, inputs, refreshed, show_progress="hidden")
    poll_while_visible(PANEL, [timer], refresh, inputs, refreshed)
