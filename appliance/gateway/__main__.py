"""`python -m appliance.gateway --engine-url URL`: the gateway alone, on loopback, in front of an
engine the appliance does not manage (benchmarks, debugging). It never shares on the LAN; the
appliance's own gateway (`step-station up`) is the one the Sharing tab controls.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from appliance import endpoint
from appliance import settings as st
from appliance.gateway.engine_gate import FixedEngine
from appliance.gateway.service import Gateway
from appliance.keys import KeyStore


def _served_model(url: str) -> str:
    response = endpoint.request("GET", f"{url}/v1/models", 10.0)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m appliance.gateway")
    parser.add_argument(
        "--engine-url",
        required=True,
        help="e.g. http://127.0.0.1:8001, or http+unix://%%2Fpath%%2Fengine.sock",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default="", help="served model name (asked from the engine)")
    parser.add_argument("--require-key", action="store_true", help="ask for a key on loopback")
    parser.add_argument("--concurrency", type=int, default=0, help="per-key cap (0: none)")
    parser.add_argument("--per-minute", type=int, default=0, help="per-key rate (0: none)")
    parser.add_argument("--access-log", action="store_true", help="print the access log")
    parser.add_argument(
        "--fleet",
        default="",
        help="fleet members NAME=URL,... behind vllm-router (docs/fleet.md; benchmarks)",
    )
    parser.add_argument("--fleet-policy", default="cache_aware", help="vllm-router's --policy")
    args = parser.parse_args(argv)
    if args.access_log:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    url = args.engine_url.rstrip("/")
    settings = st.with_changes(
        st.Settings(),
        {
            "gateway.port": args.port,
            "gateway.require_key_on_loopback": args.require_key,
            "gateway.per_key_concurrency": args.concurrency,
            "gateway.per_key_requests_per_minute": args.per_minute,
            "fleet.members": args.fleet,
            "fleet.policy": args.fleet_policy,
        },
    )
    gateway = Gateway(
        settings,
        KeyStore(),
        FixedEngine(url, args.model or _served_model(url)),
        access_log_file=False,
    )
    gateway.start()
    sys.stdout.write(f"gateway on http://127.0.0.1:{gateway.port}/v1 -> {url}\n")
    sys.stdout.flush()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    gateway.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
