"""The framed channel: nothing is unpickled before the peer has shown the cluster token."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import ssl
import struct
import subprocess
import threading

import pytest

from rayx import transfer, wire
from rayx.config import load_settings

from .conftest import REPO, wait_for


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


def _voluntary_switches(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt"))


def test_a_reader_wakes_once_per_message_not_when_the_peer_reads(tmp_path):
    """A thread blocked in recv() on a Unix socket also wakes each time the peer reads what
    this side wrote; the reader waits in poll(), which wakes for input alone."""
    import queue
    import sys

    got: queue.SimpleQueue = queue.SimpleQueue()
    tids: set[int] = set()

    def handler(conn, msg):
        tids.add(threading.get_native_id())
        got.put(msg)

    lst = wire.Listener(f"unix:{tmp_path}/s.sock", "secret", handler).start()
    echo = ("import sys, threading, time\nfrom rayx import wire\n"  # replies 1 ms after reading
            "wire.connect(sys.argv[1], 'secret', lambda c, m: (time.sleep(0.001), c.send(m)))\n"
            "threading.Event().wait()\n")
    peer = subprocess.Popen([sys.executable, "-c", echo, lst.address],
                            env=dict(os.environ, PYTHONPATH=REPO))
    try:
        wait_for(lambda: lst.connections, 10, what="the echo peer to connect")
        conn = next(iter(lst.connections))
        conn.send(0)
        assert got.get(timeout=10) == 0
        (tid,) = tids
        before, n = _voluntary_switches(tid), 300
        for i in range(1, n + 1):
            conn.send(i)
            assert got.get(timeout=10) == i
        per_message = (_voluntary_switches(tid) - before) / n
        assert per_message < 1.5, f"the reader slept {per_message:.2f} times per message"
    finally:
        peer.kill()
        peer.wait()
        lst.stop()


# --------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=rayx-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture
def tls(certificate):
    cert, key = certificate
    wire.configure_tls(load_settings(tls_cert=cert, tls_key=key, tls_ca=cert))
    yield certificate
    wire.configure_tls(load_settings(tls_cert="", tls_key="", tls_ca=""))


def test_tls_channel_carries_frames_both_ways_from_many_threads(tls):
    received: list = []
    lst = wire.Listener("tcp:127.0.0.1:0", "secret",
                        lambda conn, msg: (received.append(msg), conn.send(("echo", msg[1]))))
    lst.start()
    replies: list = []
    try:
        conn = wire.connect(lst.address, "secret", lambda c, m: replies.append(m))
        assert conn.tls is not None
        big = os.urandom(3 << 20)
        senders = [threading.Thread(target=lambda i=i: [conn.send(("n", (i, k)))
                                                        for k in range(200)]) for i in range(4)]
        for t in senders:
            t.start()
        conn.send(("n", big))
        for t in senders:
            t.join()
        wait_for(lambda: len(replies) == 801, 20, what="every echo")
        assert big in [m[1] for m in replies]
        for i in range(4):  # each sender's frames arrive in its order
            assert [m[1][1] for m in received if isinstance(m[1], tuple) and m[1][0] == i] == \
                list(range(200))
        conn.close()
    finally:
        lst.stop()


def test_tls_frames_that_arrive_with_the_handshake_are_served(tls):
    """The client's last handshake record and its first frames in one TCP segment: the
    listener decodes the frames already buffered instead of waiting for more bytes."""
    received: list = []
    lst = _listener(received)
    try:
        _, addr = wire.parse_address(lst.address)
        with socket.create_connection(addr, timeout=10) as sock:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            client = wire._tls_client.wrap_bio(incoming, outgoing, server_hostname=addr[0])
            while True:
                try:
                    client.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    sock.sendall(outgoing.read())
                    incoming.write(sock.recv(1 << 16))
            for frame in (b"RXH1secret", pickle.dumps(("ping",))):
                client.write(struct.pack("<I", len(frame)) + frame)
            sock.sendall(outgoing.read())  # Finished, token and message together
            wait_for(lambda: received, 10, what="the frame sent with the handshake")
        assert received == [("ping",)]
    finally:
        lst.stop()


def test_tls_listener_refuses_plain_and_certificate_less_peers(tls, tmp_path):
    cert, _ = tls
    received: list = []
    lst = _listener(received)
    try:
        family, addr = wire.parse_address(lst.address)
        with socket.create_connection(addr, timeout=5) as sock:  # plain TCP, right token
            _raw_send(sock, b"RXH1secret")
            _raw_send(sock, pickle.dumps(("ping",)))
            sock.settimeout(5)
            assert sock.recv(1) == b""
        no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        no_cert.load_verify_locations(cert)
        with socket.create_connection(addr, timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with no_cert.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    _raw_send(sock, b"RXH1secret")
                    sock.recv(1)
                    raise ConnectionError("closed")
        assert received == []
    finally:
        lst.stop()


def test_object_pull_under_tls(tls, tmp_path):
    src = tmp_path / "object"
    data = os.urandom(5 << 20)
    src.write_bytes(data)
    server = transfer.TransferServer("127.0.0.1", "secret", lambda oid, who: str(src)).start()
    try:
        dest = tmp_path / "copy"
        path, size = transfer.pull("127.0.0.1", server.port, "secret", "oid", "me",
                                   lambda n: str(dest))
        assert size == len(data) and open(path, "rb").read() == data
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as plain:
            plain.sendall(b"secret oid me\n")  # the right token, without TLS
            got = b""
            try:
                while chunk := plain.recv(1 << 16):
                    got += chunk
            except ConnectionResetError:  # the server dropped it mid-handshake
                pass
        assert len(got) < 64  # at most a TLS alert: neither a size nor the object
    finally:
        server.stop()


def _holder_that_stops_halfway(size: int) -> tuple[socket.socket, threading.Thread]:
    """A fake transfer server: announces `size` bytes, sends half of them, hangs up."""
    lst = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = lst.accept()
        with conn:
            conn.recv(1024)  # the request line
            conn.sendall(struct.pack("<Q", size) + b"\1" * (size // 2))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return lst, thread


def test_a_pull_cut_short_fails_and_leaves_no_file(tmp_path):
    from rayx.exceptions import ObjectLostError

    lst, thread = _holder_that_stops_halfway(3 << 20)
    dest = tmp_path / "copy"
    try:
        with pytest.raises(ObjectLostError, match="went away while sending object oid"):
            transfer.pull("127.0.0.1", lst.getsockname()[1], "secret", "oid", "me",
                          lambda n: str(dest))
    finally:
        thread.join(5)
        lst.close()
    assert os.listdir(tmp_path) == []  # neither the object nor its .pull file


def test_a_pull_into_a_full_store_is_an_error_not_a_crash():
    """The receiver writes with pwrite(): a full /dev/shm raises ENOSPC (a write through a
    mapping would kill the node with SIGBUS). /dev/full stands in for the full store."""
    import errno

    a, b = socket.socketpair()
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        a.sendall(b"\1" * 4096)
        with pytest.raises(OSError) as info:
            transfer._recv_to_file(b, fd, 4096, "gone")
        assert info.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
        a.close()
        b.close()
