"""@rayx.remote on a class: ActorClass, ActorHandle and ActorMethod."""

from __future__ import annotations

import inspect

from rayx import api, ids, serialization
from rayx.exceptions import InvalidOptionError
from rayx.options import (
    ACTOR_OPTIONS,
    METHOD_OPTIONS,
    check_options,
    resource_request,
    strategy_fields,
)
from rayx.protocol import rayx_pb2 as pb
from rayx.remote_function import _retries, encode_args
from rayx.task_spec import ActorCreation, HandleMeta, TaskSpec


def method(**options):
    """Decorator for actor methods: `@rayx.method(num_returns=2)`."""
    check_options(options, METHOD_OPTIONS, "actor method")

    def wrap(fn):
        fn.__rayx_method_options__ = options
        return fn

    return wrap


class ActorClass:
    """A class whose instances live in a worker: `Cls.remote(...)` returns an ActorHandle."""

    def __init__(self, cls: type, options: dict):
        self._cls = cls
        self._name = cls.__qualname__
        self._options = check_options(dict(options), ACTOR_OPTIONS, f"actor class {self._name}")
        self._cls_bytes: bytes | None = None
        self._methods = {}
        self._is_async = False
        for name, member in inspect.getmembers(cls, callable):
            if name.startswith("__") and name != "__call__":
                continue
            opts = getattr(member, "__rayx_method_options__", {})
            self._methods[name] = opts.get("num_returns", 1)
            if inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member):
                self._is_async = True

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor class {self._name} cannot be instantiated directly; "
                        f"use {self._cls.__name__}.remote(...)")

    def options(self, **options) -> _ActorOptionsBound:
        check_options(options, ACTOR_OPTIONS, f"actor class {self._name}")
        return _ActorOptionsBound(self, {**self._options, **options})

    def remote(self, *args, **kwargs) -> ActorHandle:
        return self._create(args, kwargs, self._options)

    def _create(self, args, kwargs, options: dict) -> ActorHandle:
        core = api.core()
        name = options.get("name") or ""
        if name and options.get("get_if_exists"):
            existing = api.lookup_actor(name)
            if existing is not None:
                return existing
        if self._cls_bytes is None:
            self._cls_bytes = serialization.dumps(self._cls)
        enc_args, enc_kwargs, deps, nested = encode_args(core, args, kwargs)
        actor_id = ids.new_id()
        max_concurrency = options.get("max_concurrency") or (1000 if self._is_async else 1)
        creation = ActorCreation(actor_id, self._name, self._cls_bytes, enc_args, enc_kwargs,
                                 max_concurrency, self._is_async, core.address, name)
        meta = HandleMeta(actor_id, self._name, dict(self._methods),
                          _retries(options.get("max_task_retries"), 0))
        strategy, affinity = strategy_fields(options)
        resources = resource_request(options, 0.0)
        spec = pb.ActorSpec(
            actor_id=actor_id, name=name, detached=options.get("lifetime") == "detached",
            max_restarts=options.get("max_restarts") or 0,
            resources=pb.ResourceMap(amounts=resources), owner_id=core.client_id,
            handle_meta=serialization.dumps(meta), node_affinity=affinity,
            affinity_soft=strategy != "AFFINITY")
        # restarts replay the arguments: what they refer to stays while the owner lives
        core.table.mark_escaped([d.id for d in deps] + [r.id for r in nested])

        def send(_spec=None):
            spec.creation_task = serialization.dumps(creation)
            reply = core.head.CreateActor(spec)
            if not reply.ok:
                raise InvalidOptionError(reply.error) if name else RuntimeError(reply.error)

        if deps:  # wait for argument refs without blocking the caller
            pseudo = TaskSpec(actor_id, self._name, enc_args, enc_kwargs, [], core.client_id,
                              core.address)
            core._resolve_then(pseudo, deps, lambda s: send())
        else:
            send()
        return ActorHandle(meta, owned=not spec.detached and not name)


class _ActorOptionsBound:
    def __init__(self, cls: ActorClass, options: dict):
        self._cls, self._options = cls, options

    def remote(self, *args, **kwargs) -> ActorHandle:
        return self._cls._create(args, kwargs, self._options)


class ActorHandle:
    """A reference to a live actor; pass it to tasks and other actors freely."""

    def __init__(self, meta: HandleMeta, owned: bool = False):
        self._meta = meta
        self._owned = owned  # the creator's handle: dropping it ends an unnamed actor

    @property
    def actor_id(self) -> str:
        return self._meta.actor_id

    def __getattr__(self, name: str) -> ActorMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._meta.methods:
            raise AttributeError(f"actor {self._meta.class_name} has no method {name!r}")
        return ActorMethod(self, name, self._meta.methods[name])

    def __repr__(self) -> str:
        return f"ActorHandle({self._meta.class_name}, {self._meta.actor_id})"

    def __reduce__(self):
        self._owned = False  # a copy escaped: its lifetime is no longer this handle's
        return (ActorHandle, (self._meta,))

    def __del__(self) -> None:
        if self._owned:
            try:
                api.kill_quietly(self._meta.actor_id)
            except Exception:
                pass


class ActorMethod:
    """`handle.method`: call it with `.remote(...)`."""

    def __init__(self, handle: ActorHandle, name: str, num_returns: int):
        self._handle, self._name, self._num_returns = handle, name, num_returns

    def __call__(self, *args, **kwargs):
        raise TypeError(f"actor method {self._name} cannot be called directly; "
                        f"use .{self._name}.remote(...)")

    def options(self, **options) -> _MethodOptionsBound:
        check_options(options, METHOD_OPTIONS, f"actor method {self._name}")
        return _MethodOptionsBound(self, options)

    def remote(self, *args, **kwargs):
        return self._call(args, kwargs, {})

    def _call(self, args, kwargs, options: dict):
        core = api.core()
        meta = self._handle._meta
        enc_args, enc_kwargs, deps, nested = encode_args(core, args, kwargs)
        n = options.get("num_returns") or self._num_returns
        task_id = ids.new_id()
        spec = TaskSpec(task_id=task_id, name=f"{meta.class_name}.{self._name}", args=enc_args,
                        kwargs=enc_kwargs, return_ids=[f"{task_id}{i:02x}" for i in range(n)],
                        owner_id=core.client_id, owner_address=core.address,
                        max_retries=_retries(options.get("max_task_retries"),
                                             meta.max_task_retries),
                        actor_id=meta.actor_id, method=self._name)
        refs = core.submit(spec, deps, nested)
        return refs[0] if n == 1 else refs


class _MethodOptionsBound:
    def __init__(self, m: ActorMethod, options: dict):
        self._m, self._options = m, options

    def remote(self, *args, **kwargs):
        return self._m._call(args, kwargs, self._options)
