"""Identifiers: random hex strings, unique across processes and nodes."""

from __future__ import annotations

import itertools
import os

_counter = itertools.count()
_prefix = ""
_prefix_pid = -1


def _process_prefix() -> str:
    global _prefix, _prefix_pid
    if _prefix_pid != os.getpid():  # re-seed after fork so children never repeat ids
        _prefix, _prefix_pid = os.urandom(6).hex(), os.getpid()
    return _prefix


def new_id() -> str:
    """A fresh id: 12 random hex characters per process plus a counter."""
    return f"{_process_prefix()}{next(_counter):08x}"


def random_id(nbytes: int = 8) -> str:
    """A fully random id, for sessions, nodes and tokens."""
    return os.urandom(nbytes).hex()
