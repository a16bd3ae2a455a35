"""Physical limits on this machine: a raw pipe round trip between two processes, loopback TCP
bandwidth between two processes, and numpy copy bandwidth. No runtime can beat these."""

from __future__ import annotations

import contextlib
import os
import socket
import time


@contextlib.contextmanager
def echo_process():
    """A forked process that writes back every byte it reads: yields (write_fd, read_fd)."""
    to_child_r, to_child_w = os.pipe()
    to_parent_r, to_parent_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the echo process
        os.close(to_child_w)
        os.close(to_parent_r)
        while True:
            data = os.read(to_child_r, 65536)
            if not data:
                os._exit(0)
            os.write(to_parent_w, data)
    os.close(to_child_r)
    os.close(to_parent_w)
    try:
        yield to_child_w, to_parent_r
    finally:
        os.close(to_child_w)
        os.close(to_parent_r)
        os.waitpid(pid, 0)


def pipe_round_trips(n: int) -> list[float]:
    """Latency in seconds of `n` one-byte round trips through a pair of pipes."""
    out = []
    with echo_process() as (w, rd):
        for _ in range(n):
            t = time.perf_counter()
            os.write(w, b"x")
            os.read(rd, 1)
            out.append(time.perf_counter() - t)
    return out


def pipe_pipelined(n: int) -> float:
    """Seconds for `n` one-byte messages sent back to back, then all `n` echoes read."""
    with echo_process() as (w, rd):
        t = time.perf_counter()
        for _ in range(n):
            os.write(w, b"x")
        got = 0
        while got < n:
            got += len(os.read(rd, n - got))
        return time.perf_counter() - t


def tcp_transfer(nbytes: int) -> float:
    """Seconds to send `nbytes` over loopback TCP to a forked process that receives them all."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # receiver: read everything into one buffer, then say so
        conn = socket.create_connection(("127.0.0.1", port))
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            k = conn.recv_into(view[got:], nbytes - got)
            if not k:
                break
            got += k
        os.write(done_w, b"1")
        os._exit(0)
    conn, _ = server.accept()
    payload = memoryview(bytearray(nbytes))
    t = time.perf_counter()
    conn.sendall(payload)
    os.read(done_r, 1)
    elapsed = time.perf_counter() - t
    conn.close()
    server.close()
    os.close(done_r)
    os.close(done_w)
    os.waitpid(pid, 0)
    return elapsed


def numpy_copy(arr, dst) -> float:
    """Seconds for np.copyto(dst, arr) into memory already touched: memcpy bandwidth."""
    import numpy as np

    t = time.perf_counter()
    np.copyto(dst, arr)
    return time.perf_counter() - t


def shm_copy(arr) -> float:
    """Seconds to write `arr` into a new /dev/shm file: what a put into a shared-memory store
    of files must at least pay (tmpfs page allocation included)."""
    import tempfile

    fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="rayx-bench-")
    try:
        view = memoryview(arr).cast("B")
        t = time.perf_counter()
        done = 0
        while done < view.nbytes:
            done += os.write(fd, view[done:])
        return time.perf_counter() - t
    finally:
        os.close(fd)
        os.unlink(path)
