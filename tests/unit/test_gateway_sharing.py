"""Where the gateway and the UI listen, what needs a key, the addresses shown (the snippets:
test_client_snippets.py)."""

from __future__ import annotations

import dataclasses

import psutil
import pytest

from appliance import settings as st
from appliance.errors import SettingsError
from appliance.gateway.service import bind_host, config_for
from appliance.gateway.sharing import share_addresses
from appliance.keys import OwnerLogin, ui_bind_host


def test_the_gateway_listens_on_loopback_unless_shared() -> None:
    gw = st.GatewaySettings()
    assert bind_host(gw) == "127.0.0.1"
    gw = dataclasses.replace(gw, interface="10.1.2.3")
    assert bind_host(gw) == "127.0.0.1"  # an interface alone does not share
    gw = dataclasses.replace(gw, share_lan=True)
    assert bind_host(gw) == "10.1.2.3"
    gw = dataclasses.replace(gw, interface="")
    assert bind_host(gw) == "0.0.0.0"
    gw = dataclasses.replace(gw, interface="lo")  # an interface name resolves to its IPv4 address
    assert bind_host(gw) == "127.0.0.1"
    gw = dataclasses.replace(gw, interface="no-such-if0")
    with pytest.raises(SettingsError, match="not an interface"):
        bind_host(gw)


def test_keys_are_required_whenever_shared_and_optional_on_loopback() -> None:
    gw = st.GatewaySettings()
    assert not config_for(gw, "127.0.0.1").require_key
    gw = dataclasses.replace(gw, require_key_on_loopback=True)
    assert config_for(gw, "127.0.0.1").require_key
    gw = dataclasses.replace(gw, require_key_on_loopback=False)
    assert config_for(gw, "0.0.0.0").require_key
    assert config_for(gw, "192.168.1.20").require_key
    gw = dataclasses.replace(gw, share_lan=True)
    assert config_for(gw, "127.0.0.2").require_key  # shared on a loopback-looking interface
    gw = dataclasses.replace(gw, max_body_mb=3)
    assert config_for(gw, "0.0.0.0").max_body_bytes == 3 << 20


def test_the_ui_goes_beyond_loopback_only_with_an_owner_login() -> None:
    settings = st.Settings()
    assert ui_bind_host(settings) == "127.0.0.1"
    settings = st.with_changes(settings, {"ui.lan": True})
    assert ui_bind_host(settings) == "127.0.0.1"  # no login set: stays on loopback
    OwnerLogin().set("owner", "long enough")
    assert ui_bind_host(settings) == "0.0.0.0"
    settings = st.with_changes(settings, {"ui.host": "192.168.7.7"})
    assert ui_bind_host(settings) == "192.168.7.7"


def test_addresses_list_every_ipv4_of_up_interfaces_best_first() -> None:
    everything = share_addresses("0.0.0.0", 8000)
    mine = {
        a.address
        for name, addrs in psutil.net_if_addrs().items()
        for a in addrs
        if a.family.name == "AF_INET" and psutil.net_if_stats()[name].isup
    }
    assert {a.address for a in everything} == mine
    assert all(a.url == f"http://{a.address}:8000/v1" for a in everything)
    notes = [a.note for a in everything]
    assert notes[-1] == "this machine only"  # loopback last
    for a in everything:
        if a.interface.startswith("docker"):
            assert "cannot reach" in a.note
    one = share_addresses("127.0.0.1", 9000)
    assert [(a.address, a.url) for a in one] == [("127.0.0.1", "http://127.0.0.1:9000/v1")]
