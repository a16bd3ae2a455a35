"""Plain data that travels between processes: task specs, actor specs, object descriptors.

An encoded argument is one of
    ("v", bytes)                         a value serialized inline
    ("r", object_id, owner_address, desc) a top-level ObjectRef, resolved by the owner
An object descriptor (`desc`) is one of
    ("i", bytes)                         the serialized object itself (small values, errors)
    ("s", node_id, node_address, size)   the object sits in that node's shared-memory store
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields


@dataclass(slots=True)
class TaskSpec:
    """One call of a remote function or actor method, as pushed to a worker."""

    task_id: str
    name: str
    args: list
    kwargs: dict
    return_ids: list[str]
    owner_id: str
    owner_address: str
    fn_id: str = ""
    fn_bytes: bytes | None = None
    resources: dict = field(default_factory=dict)
    max_retries: int = 0
    retry_exceptions: bool | tuple = False
    actor_id: str = ""
    method: str = ""
    gpu_ids: list = field(default_factory=list)
    strategy: str = "DEFAULT"
    node_affinity: str = ""
    attempt: int = 0
    max_calls: int = 0  # the worker retires after running this function that many times
    lease_group: tuple = ()  # (group id, n): the submitter holds at most n leases for them
    sent_at: float = 0.0  # when the owner pushed it (monotonic), to learn task durations

    def __reduce__(self):
        # every task crosses a socket as a pickle; the dataclass's own state functions walk
        # fields() on each pickle and unpickle, which cost more than the rest of it
        return (TaskSpec, _spec_values(self))


_spec_values = operator.attrgetter(*(f.name for f in fields(TaskSpec)))


@dataclass(slots=True)
class ActorCreation:
    """What a worker needs to build an actor; replayed on every restart."""

    actor_id: str
    class_name: str
    cls_bytes: bytes
    args: list
    kwargs: dict
    max_concurrency: int
    is_async: bool
    owner_address: str
    name: str = ""


@dataclass(slots=True)
class HandleMeta:
    """What any process needs to call an actor: enough to rebuild a handle from a pickle."""

    actor_id: str
    class_name: str
    methods: dict  # method name -> num_returns
    max_task_retries: int = 0
