"""Framed sockets: the hot-path channel between owners and workers.

    sender thread --send(msg)--> [u32 length | pickle] --> reader thread --handler(conn, msg)

Messages are tuples whose first item names the message (see worker.py and core.py). A connection
owns one reader thread; `close()` stops it and the `on_close` callback runs exactly once. When
the process's settings name TLS certificates (configure_tls), TCP connections run TLS through
memory BIOs, so the reader thread and the senders never use one SSL object at the same time;
Unix sockets stay plain (they never leave the machine and are mode 0600). gRPC
carries the control plane; this channel was chosen for the per-task path because a framed Unix
socket round trip costs a fraction of a Python gRPC unary call (docs/performance.md).
"""

from __future__ import annotations

import hmac
import io
import logging
import os
import pickle
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)
_LEN = struct.Struct("<I")
_BIG = 0xFFFFFFFF
_BIGLEN = struct.Struct("<Q")
_HELLO = b"RXH1"  # the first frame of a connection: these bytes and the token, never pickled
_HELLO_MAX = 4096  # a longer first frame is refused before it is read


_tls_server: ssl.SSLContext | None = None  # set by configure_tls: TLS on TCP channels
_tls_client: ssl.SSLContext | None = None


def configure_tls(settings) -> None:
    """Use TLS on this process's TCP channels (task pushes and replies, object pulls) when its
    settings name certificates, as its gRPC channels do: a certificate makes servers speak TLS,
    and with a CA they also demand client certificates; a CA or certificate makes clients
    speak TLS and check the server's certificate against that CA."""
    global _tls_server, _tls_client
    server = client = None
    if settings.tls_cert:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(settings.tls_cert, settings.tls_key or None)
        if settings.tls_ca:
            server.load_verify_locations(settings.tls_ca)
            server.verify_mode = ssl.CERT_REQUIRED
    if settings.tls_ca or settings.tls_cert:
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if settings.tls_ca:
            client.load_verify_locations(settings.tls_ca)
        else:
            client.load_default_certs()
        if settings.tls_cert:
            client.load_cert_chain(settings.tls_cert, settings.tls_key or None)
    _tls_server, _tls_client = server, client


def tls_server_socket(sock: socket.socket) -> socket.socket:
    """For half-duplex TCP exchanges (object pulls): the accepted socket, under TLS if set."""
    if _tls_server is None:
        return sock
    return _tls_server.wrap_socket(sock, server_side=True)


def tls_client_socket(sock: socket.socket, host: str) -> socket.socket:
    """The connected socket of a half-duplex exchange, under TLS if this process uses it."""
    if _tls_client is None:
        return sock
    return _tls_client.wrap_socket(sock, server_hostname=host)


class _TlsSession:
    """TLS over one socket through memory BIOs. `lock` serializes every use of the SSL
    object; the owning Connection's send lock orders the records on the wire."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 hostname: str | None = None):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=server_side,
                                server_hostname=hostname)
        self.lock = threading.Lock()
        self.ready = threading.Event()

    def handshake(self) -> None:
        while True:
            try:
                with self.lock:
                    self.obj.do_handshake()
                self._flush()
                self.ready.set()
                return
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the peer closed the connection during the TLS "
                                          "handshake (does it use TLS too?)") from None
                with self.lock:
                    self.incoming.write(data)

    def _flush(self) -> None:
        with self.lock:
            data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def send(self, data: bytes) -> None:
        """Encrypt and send; the caller holds the connection's send lock."""
        with self.lock:
            view = memoryview(data)
            while view:
                view = view[self.obj.write(view):]
            out = self.outgoing.read()
        self.sock.sendall(out)

    def receive(self, send_lock: threading.Lock) -> bytes:
        """Plain bytes from the next records; b"" when the peer closed. Records already
        buffered (read along with the handshake's last one, say) come first: the peer may
        send nothing more until they are answered."""
        while True:
            if self.incoming.pending or self.obj.pending():
                data = self._decode(send_lock)
                if data is not None:
                    return data
            raw = self.sock.recv(1 << 18)
            if not raw:
                return b""
            with self.lock:
                self.incoming.write(raw)

    def _decode(self, send_lock: threading.Lock) -> bytes | None:
        """Every whole record buffered, decrypted; None when a record is still incomplete."""
        with send_lock:  # what reading makes the SSL object write goes out in order
            with self.lock:
                chunks = []
                closed = False
                try:
                    while chunk := self.obj.read(1 << 18):
                        chunks.append(chunk)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    closed = True
                out = self.outgoing.read()
            if out:
                self.sock.sendall(out)
        if chunks or closed:
            return b"".join(chunks)
        return None


class _TlsReader:
    """The file-like read(n) the framed read loop needs, over a TLS session."""

    def __init__(self, session: _TlsSession, send_lock: threading.Lock):
        self.session, self.send_lock = session, send_lock
        self.buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.session.receive(self.send_lock)
            if not data:
                break
            self.buf += data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self) -> None:
        self.buf.clear()


def parse_address(address: str) -> tuple[int, object]:
    """'unix:/path' or 'tcp:host:port' -> (family, sockaddr)."""
    kind, _, rest = address.partition(":")
    if kind == "unix":
        return socket.AF_UNIX, rest
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        return socket.AF_INET, (host, int(port))
    raise ValueError(f"bad socket address {address!r}: expected unix:PATH or tcp:HOST:PORT")


def remove_socket_file(address: str) -> None:
    """Unlink the file of a Unix socket address (a TCP address has none)."""
    if address.startswith("unix:"):
        try:
            os.unlink(address[5:])
        except FileNotFoundError:
            pass


class _PolledSocketIO(io.RawIOBase):
    """A socket's reading side that waits in poll() before each recv. A thread blocked in
    recv() on a Unix socket is also woken each time the peer reads what this side wrote, only
    to sleep again; poll() wakes for input alone. Like makefile(), it keeps the socket's file
    descriptor open until it is closed, whichever thread closes the socket meanwhile."""

    def __init__(self, sock: socket.socket):
        self._raw = sock.makefile("rb", buffering=0)
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        self._poll.poll()
        return self._raw.readinto(b)

    def close(self) -> None:
        self._raw.close()
        super().close()


class Connection:
    """One framed, bidirectional socket with a reader thread."""

    def __init__(self, sock: socket.socket, handler: Callable, on_close: Callable | None = None,
                 name: str = "rayx-conn", expect_token: str | None = None,
                 tls: _TlsSession | None = None):
        self.sock = sock
        self.tls = tls
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
        if self.tls is not None and not self.tls.ready.wait(30):
            raise ConnectionError("the TLS handshake did not finish")
        with self._send_lock:
            if self.closed:
                raise ConnectionError("connection closed")
            try:
                if self.tls is not None:
                    self.tls.send(head + data)
                elif n < 65536:
                    self.sock.sendall(head + data)
                else:
                    self.sock.sendall(head)
                    self.sock.sendall(data)
            except OSError as exc:
                raise ConnectionError(str(exc)) from exc

    def _read_loop(self) -> None:
        f = None
        try:
            if self.tls is not None:
                if not self.tls.ready.is_set():  # accepted: the handshake happens here, off
                    self.tls.handshake()          # the accept loop
                f = _TlsReader(self.tls, self._send_lock)
            else:
                f = io.BufferedReader(_PolledSocketIO(self.sock), 1 << 16)
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
        except ssl.SSLError as exc:
            log.warning("refused a connection: TLS failed (%s)", exc)
        except (OSError, ValueError, EOFError, ConnectionError):
            pass
        finally:
            if f is not None:
                f.close()
            if self.tls is not None:
                self.tls.ready.set()  # senders waiting on a failed handshake fail now
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
    tls = None
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if _tls_client is not None:
            tls = _TlsSession(sock, _tls_client, server_side=False, hostname=sockaddr[0])
            try:
                tls.handshake()
            except BaseException:
                sock.close()
                raise
    sock.settimeout(None)
    conn = Connection(sock, handler, on_close, name=f"rayx-conn-{address}", tls=tls)
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
            tls = None
            if sock.family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if _tls_server is not None:
                    tls = _TlsSession(sock, _tls_server, server_side=True)
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                conn = Connection(sock, self.handler, self._closed, expect_token=self.token,
                                  tls=tls)
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
        remove_socket_file(self.address)

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
