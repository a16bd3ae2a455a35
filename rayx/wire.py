"""Framed sockets: the hot-path channel between owners and workers.

    sender thread --send(msg)--> [u32 length | pickle] --> reader thread --handler(conn, msg)

Messages are tuples whose first item names the message (see worker.py and core.py). A connection
owns one reader thread; `close()` stops it and the `on_close` callback runs exactly once. gRPC
carries the control plane; this channel was chosen for the per-task path because a framed Unix
socket round trip costs a fraction of a Python gRPC unary call (docs/performance.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import pickle
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
_BIG = 0xFFFFFFFF
_BIGLEN = struct.Struct("<Q")
_HELLO = b"RXH1"  # the first frame of a connection: these bytes and the token, never pickled
_HELLO_MAX = 4096  # a longer first frame is refused before it is read


def parse_address(address: str) -> tuple[int, object]:
    """'unix:/path' or 'tcp:host:port' -> (family, sockaddr)."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    raise ValueError(f"bad socket address {address!r}: expected unix:PATH or tcp:HOST:PORT")


class Connection:
    """One framed, bidirectional socket with a reader thread."""

    def __init__(self, sock: socket.socket, handler: Callable, on_close: Callable | None = None,
                 name: str = "rayx-conn", expect_token: str | None = None):
        self.sock = sock
        self.expect_token = expect_token  # accepted connections must send the hello frame first
        self.handler = handler
        self.on_close = on_close
        self.closed = False
        self.peer: object = None  # what the owner of the connection learned about the peer
        self._send_lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name=name, daemon=True)

    def start(self) -> Connection:
        self._reader.start()
        return self

    def send(self, msg) -> None:
        """Send one message; raises ConnectionError if the peer is gone."""
        self._send_frame(pickle.dumps(msg, protocol=5))

    def _send_frame(self, data: bytes) -> None:
        n = len(data)
        head = _LEN.pack(n) if n < _BIG else _LEN.pack(_BIG) + _BIGLEN.pack(n)
        with self._send_lock:
            if self.closed:
                raise ConnectionError("connection closed")
            try:
                if n < 65536:
                    self.sock.sendall(head + data)
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionError(str(exc)) from exc

    def _read_loop(self) -> None:
        f = self.sock.makefile("rb", buffering=1 << 16)
        try:
            while True:
                head = f.read(4)
                if len(head) < 4:
                    break
                (n,) = _LEN.unpack(head)
                if self.expect_token is not None:  # nothing is unpickled before the token
                    if not self._authenticate(f.read(n) if n <= _HELLO_MAX else b""):
                        log.warning("refused a connection: missing or wrong cluster token")
                        break
                    continue
                if n == _BIG:
                    (n,) = _BIGLEN.unpack(f.read(8))
                data = f.read(n)
                if len(data) < n:
                    break
                self.handler(self, pickle.loads(data))
        except (OSError, ValueError, EOFError):
            pass
        finally:
            f.close()
            self.close()

    def _authenticate(self, frame: bytes) -> bool:
        expected = _HELLO + self.expect_token.encode()
        if not hmac.compare_digest(frame, expected):
            return False
        self.expect_token = None
        return True

    def close(self) -> None:
        """Close the socket; the on_close callback runs once, from whichever thread gets here."""
        with self._close_lock:
            if self.closed:
                return
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.on_close is not None:
            self.on_close(self)

    def join(self, timeout: float | None = None) -> None:
        if self._reader is not threading.current_thread() and self._reader.is_alive():
            self._reader.join(timeout)


def connect(address: str, token: str, handler: Callable, on_close: Callable | None = None,
            timeout: float = 10.0) -> Connection:
    """Open a connection to a Listener at `address`, present the token, start the reader."""
    family, sockaddr = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(sockaddr)
    sock.settimeout(None)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock, handler, on_close, name=f"rayx-conn-{address}")
    conn._send_frame(_HELLO + token.encode())
    return conn.start()


class Listener:
    """Accepts connections on a socket; each gets its own Connection and reader thread."""

    def __init__(self, address: str, token: str, handler: Callable,
                 on_close: Callable | None = None, on_accept: Callable | None = None):
        self.token = token
        family, sockaddr = parse_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            if os.path.exists(sockaddr):
                os.unlink(sockaddr)
        else:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(sockaddr)
        if family == socket.AF_UNIX:
            os.chmod(sockaddr, 0o600)
            self.address = address
        else:
            host, port = self.sock.getsockname()[:2]
            self.address = f"tcp:{host}:{port}"
        self.sock.listen(128)
        self.handler, self.on_close, self.on_accept = handler, on_close, on_accept
        self.connections: set[Connection] = set()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._accept_loop, name="rayx-listener",
                                        daemon=True)

    def start(self) -> Listener:
        self._thread.start()
        return self

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except OSError:
                return
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                conn = Connection(sock, self.handler, self._closed, expect_token=self.token)
                self.connections.add(conn)
            if self.on_accept is not None:
                self.on_accept(conn)
            conn.start()

    def _wake_accept(self) -> None:
        """accept() does not return when its socket is closed: connect once to end it."""
        family, sockaddr = parse_address(self.address)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(sockaddr)
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2)
        if family == socket.AF_UNIX:
            try:
                os.unlink(sockaddr)
            except FileNotFoundError:
                pass

    def _closed(self, conn: Connection) -> None:
        with self._lock:
            self.connections.discard(conn)
        if self.on_close is not None:
            self.on_close(conn)

    def stop(self) -> None:
        """Stop accepting and close every open connection."""
        with self._lock:
            self._stopped = True
            conns = list(self.connections)
        self._wake_accept()
        self.sock.close()
        for c in conns:
            c.close()
