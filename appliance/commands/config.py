"""`step-station config show|get|set|path|set-secret`.

While the service runs, `config set` goes to its settings store over the control socket
(appliance/control.py): saved as without it, and the service's engine supervisor and gateway take
the new value at once (an engine that must restart for it says so). Without a service the command
validates and saves it itself.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from appliance import settings as st
from appliance.control import running_service


def register(sub: Any) -> None:
    parser = sub.add_parser("config", help="show or change settings")
    csub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    show = csub.add_parser("show", help="print every setting")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=_show)
    get = csub.add_parser("get", help="print one setting, e.g. engine.port")
    get.add_argument("key")
    get.set_defaults(func=_get)
    set_ = csub.add_parser("set", help="change one setting, e.g. `config set engine.port 8002`")
    set_.add_argument("key")
    set_.add_argument("value")
    set_.set_defaults(func=_set)
    path = csub.add_parser("path", help="print where settings and data live")
    path.set_defaults(func=_path)
    secret = csub.add_parser("set-secret", help="store a secret (read from stdin or a prompt)")
    secret.add_argument("name", choices=["hf_token"])
    secret.set_defaults(func=_set_secret)


def _load() -> st.Settings:
    result = st.load_settings()
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.settings


def _show(args: argparse.Namespace) -> int:
    data = _load().to_dict()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(st.dumps(data), end="")
    secrets = st.load_secrets()
    print(f"# secrets ({st.secrets_path()}): hf_token {'set' if secrets.hf_token else 'not set'}")
    return 0


def _get(args: argparse.Namespace) -> int:
    value = _load().get(args.key)
    print(json.dumps(value) if not isinstance(value, str) else value)
    return 0


def _set(args: argparse.Namespace) -> int:
    service = running_service()
    if service is not None:  # the service's store saves it, and its parts take it at once
        change = service.update_settings({args.key: args.value})
        value = change.settings.get(args.key)
        print(f"{args.key} = {value!r} (saved to {change.path}; the running service uses it now)")
        if change.status.restart_needed:
            print(
                "Note: the engine runs with the settings it started with; "
                "`step-station restart` applies the new ones."
            )
        return 0
    store = st.SettingsStore(_load())
    settings = store.update({args.key: args.value})
    print(f"{args.key} = {settings.get(args.key)!r} (saved to {store.path})")
    return 0


def _path(args: argparse.Namespace) -> int:
    del args
    print(f"settings: {st.settings_path()}")
    print(f"secrets:  {st.secrets_path()}")
    print(f"data:     {st.data_dir()}")
    print(f"cache:    {st.cache_dir()}")
    return 0


def _set_secret(args: argparse.Namespace) -> int:
    value = sys.stdin.readline().strip() if not sys.stdin.isatty() else getpass.getpass()
    secrets = st.load_secrets()
    setattr(secrets, args.name, value)
    path = st.save_secrets(secrets)
    print(f"{args.name} saved to {path} (mode 0600)")
    return 0
