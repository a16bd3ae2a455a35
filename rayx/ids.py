"""Identifiers: random hex strings, unique across processes and nodes."""

from __future__ import annotations

import itertools
import os

_counter = itertools.count()
_prefix = os.urandom(6).hex()


def _reseed() -> None:
    """A forked child gets a prefix of its own, so it never repeats its parent's ids."""
    global _prefix
    _prefix = os.urandom(6).hex()


os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """A fresh id: 12 random hex characters per process plus a counter."""
    return f"{_prefix}{next(_counter):08x}"


def random_id(nbytes: int = 8) -> str:
    """A fully random id, for sessions, nodes and tokens."""
    return os.urandom(nbytes).hex()
