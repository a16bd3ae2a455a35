"""The framed channel: nothing is unpickled before the peer has shown the cluster token."""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading

from rayx import wire

from .conftest import wait_for


class _Touch:
    """Unpickling this creates a file: proof that a frame was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _listener(received: list) -> wire.Listener:
    handler = lambda conn, msg: received.append(msg)  # noqa: E731
    return wire.Listener("tcp:127.0.0.1:0", "secret", handler).start()


def _raw_send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(struct.pack("<I", len(data)) + data)


def test_frames_before_the_token_are_never_unpickled(tmp_path):
    received: list = []
    lst = _listener(received)
    try:
        family, addr = wire.parse_address(lst.address)
        marker = str(tmp_path / "unpickled")
        for first in (pickle.dumps(_Touch(marker)),                       # no hello at all
                      pickle.dumps(("hello", "secret")),                  # the old, pickled form
                      b"RXH1wrong"):                                      # a wrong token
            with socket.create_connection(addr, timeout=5) as sock:
                _raw_send(sock, first)
                _raw_send(sock, pickle.dumps(_Touch(marker)))
                sock.settimeout(5)
                assert sock.recv(1) == b""  # the listener drops the connection
        assert not os.path.exists(marker)
        assert received == []
    finally:
        lst.stop()


def test_an_oversized_first_frame_is_refused_unread():
    lst = _listener([])
    try:
        family, addr = wire.parse_address(lst.address)
        with socket.create_connection(addr, timeout=5) as sock:
            sock.sendall(struct.pack("<I", 1 << 30))  # announces 1 GiB, sends nothing more
            sock.settimeout(5)
            assert sock.recv(1) == b""
    finally:
        lst.stop()


def test_a_peer_with_the_token_is_served():
    received: list = []
    lst = _listener(received)
    replies: list = []
    done = threading.Event()
    try:
        conn = wire.connect(lst.address, "secret", lambda c, m: (replies.append(m), done.set()))
        conn.send(("ping", 1))
        conn.send(("big", b"x" * 200_000))
        wait_for(lambda: len(received) == 2, 5, what="both messages")
        assert received[0] == ("ping", 1) and received[1][1] == b"x" * 200_000
        next(iter(lst.connections)).send(("pong",))
        assert done.wait(5) and replies == [("pong",)]
        conn.close()
    finally:
        lst.stop()
