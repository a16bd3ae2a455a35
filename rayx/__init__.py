"""rayx: a distributed Python runtime — tasks, actors and a shared-memory object store.

The public API is what this module lists; everything else is internal.
"""

from rayx import exceptions
from rayx.actor import ActorClass, ActorHandle, method
from rayx.api import (
    available_resources,
    cancel,
    cluster_resources,
    get,
    get_actor,
    get_gpu_ids,
    get_runtime_context,
    init,
    is_initialized,
    kill,
    kv_delete,
    kv_get,
    kv_keys,
    kv_put,
    nodes,
    put,
    shutdown,
    wait,
)
from rayx.object_ref import ObjectRef
from rayx.options import NodeAffinitySchedulingStrategy
from rayx.remote_function import RemoteFunction

__version__ = "0.1.0"


def remote(*args, **options):
    """Make a function a task or a class an actor: `@rayx.remote` or `@rayx.remote(num_cpus=2)`."""
    if len(args) == 1 and not options and callable(args[0]):
        return _make_remote(args[0], {})
    if args:
        raise TypeError("@rayx.remote takes keyword options only, e.g. @rayx.remote(num_cpus=2)")
    return lambda target: _make_remote(target, options)


def _make_remote(target, options: dict):
    if isinstance(target, type):
        return ActorClass(target, options)
    return RemoteFunction(target, options)


__all__ = [
    "ActorClass", "ActorHandle", "NodeAffinitySchedulingStrategy", "ObjectRef", "RemoteFunction",
    "available_resources", "cancel", "cluster_resources", "exceptions", "get", "get_actor",
    "get_gpu_ids", "get_runtime_context", "init", "is_initialized", "kill", "kv_delete", "kv_get",
    "kv_keys", "kv_put", "method", "nodes", "put", "remote", "shutdown", "wait",
]
