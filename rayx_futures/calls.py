"""How a RayxExecutor call travels and runs: what each call carries to its worker, the
wrapper that runs the executor's initializer there first, and the packing of a function once
for the many calls of one map().

    submit: _REMOTE_CALL(spec, fn, *args)           fn pickled with each call
    map:    a remote function of its own (_BoundFn)  fn and spec pickled once, in the function
            or _REMOTE_CALL(spec, ref of fn, ...)    a large fn put into the store once
"""

from __future__ import annotations

import functools
import importlib
import sys
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import rayx
from rayx import api, serialization


class _InitializerFailed(Exception):
    """Raised in a worker whose run of the executor's initializer failed."""


@dataclass(frozen=True, slots=True)
class _CallSpec:
    """What every call of one executor carries to the worker: its token and its initializer."""

    token: str
    init: tuple | None  # (ObjectRef of (initializer, initargs),) nested so it stays a ref


_INIT_STATE: dict[str, str | None] = {}  # in workers: executor token -> None or failed traceback


def _ensure_initialized(spec: _CallSpec) -> None:
    if spec.init is None:
        return
    if spec.token not in _INIT_STATE:
        initializer, initargs = rayx.get(spec.init[0])
        try:
            initializer(*initargs)
            _INIT_STATE[spec.token] = None
        except BaseException:
            _INIT_STATE[spec.token] = traceback.format_exc()
    failed = _INIT_STATE[spec.token]
    if failed is not None:
        raise _InitializerFailed(failed)


def _run_call(spec: _CallSpec, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
    _ensure_initialized(spec)
    return fn(*args, **kwargs)


_REMOTE_CALL = rayx.remote(_run_call)


def _process_chunk(fn: Callable, chunk: tuple) -> list:
    return [fn(*args) for args in chunk]


def _process_items(fn: Callable, chunk: tuple) -> list:
    """A chunk of a map() over one iterable: its items as they are, not as 1-tuples, which
    halves what a chunk of small items costs to build, pickle and unpickle."""
    return [fn(x) for x in chunk]


class _StoredFn:
    """A function put into the object store once, for the many calls of one map()."""

    __slots__ = ("ref", "name")

    def __init__(self, ref: rayx.ObjectRef, name: str):
        self.ref, self.name = ref, name


class _BoundFn:
    """The calls of one map() as their own remote function: fn and the executor's _CallSpec
    are pickled once into it, and each worker unpickles it once, so a call carries only its
    items. For a function small enough to travel inline with every call."""

    __slots__ = ("remote",)

    def __init__(self, remote: Any):
        self.remote = remote


def _for_map(fn: Callable, name: str, spec: _CallSpec,
             options: dict) -> Callable | _BoundFn | _StoredFn:
    """Prepare fn for a whole map(): pickling it per call costs more than a tiny call.
    With max_tasks_per_child the calls keep the executor's one remote function, which is
    what a worker counts its calls by."""
    if not rayx.is_initialized():
        return fn
    fn = _by_reference(fn)
    try:
        bound = functools.partial(_run_call, spec, fn)
        small = len(serialization.dumps(bound)) <= api.core().settings.inline_threshold
        if small and not options.get("max_calls"):
            return _BoundFn(rayx.remote(bound).options(**options, name=name))
        return _StoredFn(rayx.put(fn), name)
    except Exception:  # unpicklable: each call then fails on its own future
        return fn


def _submit_call(remote_for: Callable[[str], Any], spec: _CallSpec, fn: Callable,
                 args: tuple, kwargs: dict):
    """Send one call as a task named after fn; its top-level ObjectRef arguments resolve."""
    if isinstance(fn, _BoundFn):
        return fn.remote.remote(*args, **kwargs)
    if isinstance(fn, _StoredFn):
        remote, fn = remote_for(fn.name), fn.ref  # a top-level ref: the worker gets the function
    else:
        remote, fn = remote_for(_call_name(fn)), _by_reference(fn)
    if "self" in kwargs:  # RemoteFunction.remote(self, ...) cannot take a keyword named self
        fn, kwargs = functools.partial(fn, **kwargs), {}
    return remote.remote(spec, fn, *args, **kwargs)


class _ModuleAttr:
    """A module-level bound method (random.random) sent by name: the worker calls its own."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(self.module), self.name)(*args, **kwargs)


def _by_reference(fn: Callable) -> Callable:
    """Pickling random.random by value would copy the driver's generator into every call."""
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None)
    if owner is None or name is None or isinstance(owner, (types.ModuleType, type)):
        return fn
    for module_name in (getattr(fn, "__module__", None), type(owner).__module__):
        module = sys.modules.get(module_name) if module_name else None
        if module is not None and getattr(module, name, None) == fn:
            return _ModuleAttr(module_name, name)
    return fn


def _call_name(fn: Callable) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__
