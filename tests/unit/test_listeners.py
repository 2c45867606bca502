"""Both listeners (the UI's and the gateway's) answer small writes at once: TCP_NODELAY is on.

asyncio turns Nagle off on accepted sockets only when the listening socket was made with
proto=IPPROTO_TCP; with proto 0 every small write (an SSE message, a streamed token) waited for
the client's delayed ACK, ~40 ms, which made every UI click ~35 ms slower (benchmarks/ui_idle.py).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest
from fixtures.aio import run_async
from fixtures.sim import free_port

from appliance.gateway.service import bind_socket
from appliance.server import Listener, bind_port


def _ui(port: int) -> socket.socket:
    return bind_port(Listener("127.0.0.1", port, "ui.port", "--ui-port", "the browser UI"))


def _gateway(port: int) -> socket.socket:
    return bind_socket("127.0.0.1", port)


async def _accepted_nodelay(sock: socket.socket) -> int:
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted = transport.get_extra_info("socket")
            seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    port = sock.getsockname()[1]
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        return value
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("bind", [_ui, _gateway], ids=["ui", "gateway"])
def test_accepted_connections_have_tcp_nodelay(bind: Callable[[int], socket.socket]) -> None:
    sock = bind(free_port())
    assert sock.proto == socket.IPPROTO_TCP
    assert run_async(_accepted_nodelay(sock)) != 0
