"""`step-station keys create NAME | list [--json] | revoke NAME-or-ID`: API keys for the LAN API.

While the service runs, these go to its key store over the control socket (appliance/control.py):
the gateway checks keys against that same store, so a key revoked here is refused on its very
next request. Without a service they work on the key file directly (under a file lock, so an
appliance started later agrees).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Protocol

from appliance import settings as st
from appliance.control import running_service
from appliance.keys import ApiKey, KeyStore, NewKey


class KeyCommands(Protocol):
    """What these commands ask of a key store: the service's (ServiceKeys) or the file's."""

    def create(self, name: str) -> NewKey: ...

    def revoke(self, name_or_id: str) -> ApiKey: ...

    def list(self) -> list[ApiKey]: ...


def _keys() -> KeyCommands:
    service = running_service()
    return service.keys() if service is not None else KeyStore()


def register(sub: Any) -> None:
    parser = sub.add_parser("keys", help="API keys for the shared OpenAI endpoint")
    ksub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = ksub.add_parser("create", help="make a key (shown once)")
    create.add_argument("name", help="who or what uses it, e.g. alice-laptop")
    create.add_argument("--json", action="store_true", help="print the key as JSON")
    create.set_defaults(func=_create)
    list_ = ksub.add_parser("list", help="list keys with their use")
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(func=_list)
    revoke = ksub.add_parser("revoke", help="stop a key working (by name or id)")
    revoke.add_argument("key", metavar="NAME-or-ID")
    revoke.set_defaults(func=_revoke)


def _endpoint() -> str:
    gateway = st.load_settings().settings.gateway
    return f"port {gateway.port}" + (" (shared on the LAN)" if gateway.share_lan else "")


def _create(args: argparse.Namespace) -> int:
    made = _keys().create(args.name)
    if args.json:
        print(json.dumps({**made.record.public_dict(), "key": made.secret}))
        return 0
    print(made.secret)
    print(
        f"Key {made.record.name!r} ({made.record.id}) created for the API on {_endpoint()}. "
        "Copy it now: it is shown only this once.",
        file=sys.stderr,
    )
    return 0


def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(at)) if at else "never"


def _row(key: ApiKey) -> list[str]:
    return [
        key.name,
        key.id,
        _when(key.created),
        _when(key.last_used),
        key.last_address or "-",
        str(key.requests),
        str(key.prompt_tokens),
        str(key.completion_tokens),
        "active" if key.active else f"revoked {_when(key.revoked)}",
    ]


def _list(args: argparse.Namespace) -> int:
    keys = _keys().list()
    if args.json:
        print(json.dumps([k.public_dict() for k in keys], indent=2))
        return 0
    if not keys:
        print("No API keys yet. Make one: step-station keys create NAME")
        return 0
    head = ["NAME", "ID", "CREATED", "LAST USED", "FROM", "REQUESTS", "PROMPT", "OUTPUT", "STATUS"]
    rows = [head, *(_row(k) for k in keys)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    record = _keys().revoke(args.key)
    print(f"Revoked {record.name!r} ({record.id}); it stops working at once.")
    return 0
