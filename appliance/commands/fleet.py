"""`step-station fleet add NAME URL | remove NAME | list [--json] | key | join KEY`.

A fleet is this Station (the front) and other Stations (members) behind vLLM's router; see
docs/fleet.md. `add`/`remove` change the setting `fleet.members` through the running service's
control socket (its settings store saves it and the gateway restarts the router at once), or the
settings file when no service runs. `list` reads what the service last saw of the router
(`fleet-status.json`, private). `key` prints the fleet key (made on first use) for the members;
`join KEY` on a member keeps the front's key so that its gateway serves the front's router.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from appliance import settings as st
from appliance.control import running_service
from appliance.controllers.fleet import engine_queue, kv_text
from appliance.fleet import members as fm
from appliance.fleet.router import FleetView, status_path, view_dict, view_from_dict


def register(sub: Any) -> None:
    parser = sub.add_parser("fleet", help="other Stations served through this one (vllm-router)")
    fsub = parser.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    add = fsub.add_parser("add", help="route requests to another Station too")
    add.add_argument("name", help="a short name, e.g. station-2")
    add.add_argument("url", help="the member's API address, http://HOST:PORT")
    add.set_defaults(func=_add)
    remove = fsub.add_parser("remove", help="stop routing to a member")
    remove.add_argument("name")
    remove.set_defaults(func=_remove)
    list_ = fsub.add_parser("list", help="members and their state")
    list_.add_argument("--json", action="store_true")
    list_.set_defaults(func=_list)
    key = fsub.add_parser("key", help="print the fleet key (give it to each member's owner)")
    key.set_defaults(func=_key)
    join = fsub.add_parser("join", help="on a member: accept the front's fleet key")
    join.add_argument("key", help="the key `step-station fleet key` printed on the front")
    join.set_defaults(func=_join)


def _save_members(text: str) -> str:
    service = running_service()
    if service is not None:
        service.update_settings({"fleet.members": text})
        return "the running service routes by it now"
    store = st.SettingsStore(st.load_settings().settings)
    store.update({"fleet.members": text})
    return f"saved to {store.path}; used when the service starts"


def _add(args: argparse.Namespace) -> int:
    current = st.load_settings().settings.fleet.members
    text = fm.with_member(current, args.name, args.url)
    fm.ensure_key()
    where = _save_members(text)
    member = fm.parse_members(text)[-1]
    print(f"Added {member.name} ({member.url}) to the fleet ({where}).")
    print(
        f"On {member.name}, run `step-station fleet join KEY` with the key from "
        "`step-station fleet key`, so that its gateway serves this Station's router.",
        file=sys.stderr,
    )
    return 0


def _remove(args: argparse.Namespace) -> int:
    current = st.load_settings().settings.fleet.members
    where = _save_members(fm.without_member(current, args.name))
    print(f"Removed {args.name} from the fleet ({where}).")
    return 0


def _view() -> FleetView:
    members = fm.parse_members(st.load_settings().settings.fleet.members)
    try:
        view = view_from_dict(json.loads(status_path().read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        view = FleetView(router="off")
    if running_service() is None:
        view = FleetView(router="off", message="The service is not running.")
    seen = {m.name: m for m in view.members}
    from appliance.fleet.router import MemberView

    rows = tuple(seen.get(m.name) or MemberView(m.name, m.url, "not started") for m in members)
    return FleetView(view.router, view.policy, rows, view.message)


def _list(args: argparse.Namespace) -> int:
    view = _view()
    if args.json:
        print(json.dumps(view_dict(view), indent=2))
        return 0
    if not view.members:
        print("No fleet members. Add one: step-station fleet add NAME http://HOST:PORT")
        return 0
    print(f"router: {view.router}" + (f" ({view.policy})" if view.policy else ""))
    if view.message:
        print(view.message)
    head = ["NAME", "URL", "STATE", "LOAD", "ROUTED", "RUNNING/WAITING", "KV CACHE"]
    rows = [
        head,
        *(
            [m.name, m.url, m.state, str(m.load), str(m.routed), engine_queue(m), kv_text(m)]
            for m in view.members
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _key(args: argparse.Namespace) -> int:
    del args
    print(fm.ensure_key())
    print(
        "Give this key to each member's owner (`step-station fleet join KEY` there). Anyone "
        "holding it can use every member's engine, as with an API key.",
        file=sys.stderr,
    )
    return 0


def _join(args: argparse.Namespace) -> int:
    fm.store_key(args.key)
    print(
        f"Fleet key kept in {fm.key_path()}; this Station's gateway serves requests carrying it "
        "within a second (it must be shared on the LAN for the front to reach it)."
    )
    return 0
