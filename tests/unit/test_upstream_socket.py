"""Origin connections get a fixed kernel receive buffer (EDGE_UPSTREAM_BUFFER): what a slow
player's stream can hold in Edge is bounded by it, not by Linux's autotuning."""

from __future__ import annotations

import socket

from edge.resources import _upstream_socket


def test_origin_sockets_have_the_configured_receive_buffer() -> None:
    info = socket.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)[0]
    sizes = {}
    for wanted in (8 * 1024, 32 * 1024):
        with _upstream_socket(wanted)(info) as sock:
            # Linux doubles the value for its bookkeeping.
            sizes[wanted] = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert sock.type == socket.SOCK_STREAM
    assert sizes[8 * 1024] == 2 * 8 * 1024
    assert sizes[32 * 1024] == 2 * 32 * 1024
