"""The Sharing tab's address list when psutil cannot ask the interfaces' state.

Under qemu-user (the arm64 emulation scripts/test_aarch64.sh runs) psutil.net_if_stats() raises
ENOSYS: qemu does not emulate ioctl(SIOCETHTOOL). `step-station up --demo` died building the
Sharing tab on that before; tests/integration/test_aarch64_install.py shows the real thing under
emulation, this shows the rule on this machine with the one call made to fail as qemu fails it.
"""

from __future__ import annotations

import errno
import socket

import psutil
import pytest

from appliance.gateway import sharing


def _enosys(*_args: object, **_kwargs: object) -> object:
    raise OSError(errno.ENOSYS, "Function not implemented (ioctl SIOCETHTOOL)")


def test_addresses_are_listed_when_interface_state_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    every_ipv4 = {
        a.address
        for addrs in psutil.net_if_addrs().values()
        for a in addrs
        if a.family == socket.AF_INET
    }
    monkeypatch.setattr(sharing.psutil, "net_if_stats", _enosys)
    listed = sharing.share_addresses("0.0.0.0", 8000)
    # Every IPv4 address counts (up or not is unknown), loopback still last.
    assert {a.address for a in listed} == every_ipv4
    assert listed[-1].note == "this machine only"
    one = sharing.share_addresses("127.0.0.1", 9000)
    assert [a.url for a in one] == ["http://127.0.0.1:9000/v1"]


def test_bound_address_is_offered_when_no_interface_can_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sharing.psutil, "net_if_stats", _enosys)
    monkeypatch.setattr(sharing.psutil, "net_if_addrs", _enosys)
    listed = sharing.share_addresses("192.168.7.7", 8000)
    assert [(a.address, a.url, a.note) for a in listed] == [
        ("192.168.7.7", "http://192.168.7.7:8000/v1", "LAN")
    ]
