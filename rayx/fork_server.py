"""The template process: imports rayx and the libraries tasks use once, then forks workers.

    node manager --"<worker_id>\\n" on stdin--> fork server --fork()--> worker.main(...)
    stdin closes (node manager gone) --> fork server exits

It stays single-threaded and never opens a gRPC channel, so fork() is safe; a forked worker costs
milliseconds instead of a fresh interpreter's start.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys

from rayx.config import OPTIONAL_PREIMPORTS


def _preimport(optional: list[str] | tuple[str, ...]) -> None:
    import cloudpickle  # noqa: F401
    import grpc  # noqa: F401

    import rayx.worker  # noqa: F401
    for name in optional:
        try:
            __import__(name)
        except Exception:
            pass


def main() -> None:
    """Serve fork requests until stdin closes. argv[1] is the JSON config shared by workers."""
    config = json.loads(sys.argv[1])
    optional = config.get("preimport")
    _preimport(OPTIONAL_PREIMPORTS if optional is None else optional)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps workers: no zombies
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C in the driver's terminal is not ours
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # stack dump to stderr; workers too
    stdin = sys.stdin.buffer
    for line in iter(stdin.readline, b""):
        worker_id = line.decode().strip()
        if not worker_id:
            continue
        if os.fork() == 0:
            _child(worker_id, config)
    os._exit(0)


def _child(worker_id: str, config: dict) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # workers may run subprocesses and wait on them
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.setpgid(0, 0)  # the worker leads a process group: what its tasks start can be ended with it
    try:
        os.close(0)
        os.open(os.devnull, os.O_RDONLY)  # becomes fd 0
        from rayx import worker
        worker.main(worker_id, config)
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(0)


if __name__ == "__main__":
    main()
