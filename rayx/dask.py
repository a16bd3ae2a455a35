"""Dask on rayx: every Dask task becomes a rayx task whose dependencies are object references.

    dask.compute(x, scheduler=rayx.dask.get)
      -> get(expression | HighLevelGraph | task-spec graph | legacy graph, keys)
      -> task-spec graph -> the keys `keys` need, in topological order (iterative: no recursion)
      -> each key once:  Task     -> _run_task.remote(task, dep keys, *dep refs) -> (value, done)
                         DataNode -> rayx.put(value), or the ObjectRef it holds
                         missing  -> a persisted key: the ref of its live RayxDaskFuture
                         Alias    -> the reference of its target
      -> this thread: `done` markers arrive -> state updated, Dask callbacks fired
      -> rayx.get(the values of `keys`) -> nested tuples, as dask.local returns them

Values move from task to task through the object store: this process only receives the tiny
`done` markers, then the final results (or, for persist, RayxDaskFutures holding their refs).

The `state` that callbacks see has dask.local's keys; its values are ObjectRefs, not data:
    dependencies  {key: keys it needs}            dependents    {key: keys that need it}
    waiting       {key: its unfinished deps}      waiting_data  {key: its unfinished dependents}
    cache         {key: ObjectRef} for finished keys whose value is still needed
    ready         [] - rayx queues every task from the start; none waits in this process
    running       keys whose dependencies are all finished, not finished themselves
    finished      keys done                       released      finished keys no longer needed
"""

from __future__ import annotations

import contextlib
import queue
import threading
import weakref
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import dask
from dask._task_spec import Alias, DataNode, GraphNode, TaskRef, convert_legacy_graph
from dask.callbacks import local_callbacks, unpack_callbacks
from dask.core import flatten

import rayx
from rayx import api
from rayx.object_ref import ObjectRef

Key = Hashable


def _run_task(task: GraphNode, dep_keys: tuple, *dep_values: Any) -> tuple[Any, None]:
    """In a worker: run one Dask task on its resolved dependencies; the None marks it done."""
    return task(dict(zip(dep_keys, dep_values, strict=True))), None


_REMOTE_TASK = rayx.remote(num_returns=2)(_run_task)


class _Persisted:
    """The live RayxDaskFutures by key: a key stays known while any future for it lives.

    Dask copies futures (tokenizing pickles them), so one key can have several at once.
    """

    def __init__(self) -> None:
        self._by_key: dict[Key, weakref.WeakSet] = {}
        self._lock = threading.Lock()

    def add(self, future: RayxDaskFuture) -> None:
        with self._lock:
            if len(self._by_key) > 1024:
                self._by_key = {k: v for k, v in self._by_key.items() if v}
            self._by_key.setdefault(future.key, weakref.WeakSet()).add(future)

    def get(self, key: Key) -> RayxDaskFuture | None:
        with self._lock:
            futures = self._by_key.get(key)
            return next(iter(futures), None) if futures else None


_PERSISTED = _Persisted()


class RayxDaskFuture(TaskRef):
    """A persisted Dask key whose value stays in the object store behind `ref`.

    Dask treats it as it treats distributed's futures: graphs built on a persisted collection
    refer to its keys, and the scheduler finds them here for as long as the future lives.
    """

    __slots__ = ("ref", "__weakref__")
    __dask_future__ = True

    def __init__(self, key: Key, ref: ObjectRef):
        super().__init__(key)
        self.ref = ref
        _PERSISTED.add(self)

    def __reduce__(self):
        return (RayxDaskFuture, (self.key, self.ref))

    def __repr__(self) -> str:
        return f"RayxDaskFuture({self.key!r}, {self.ref!r})"

    def result(self, timeout: float | None = None) -> Any:
        """The value, fetched from the object store."""
        return rayx.get(self.ref, timeout=timeout)


class RayxDaskClient:
    """Runs Dask graphs on rayx: `get` computes, `persist` keeps results in the object store."""

    asynchronous = False  # dask.base treats objects named *Client with `get` as schedulers

    def __init__(self, **remote_options: Any) -> None:
        _REMOTE_TASK.options(**remote_options)  # bad options fail here, not on first use
        self.remote_options = remote_options

    def __repr__(self) -> str:
        return f"RayxDaskClient({self.remote_options})"

    def get(self, dsk: Any, keys: Any, *, callbacks: Any = None, **kwargs: Any) -> Any:
        """Dask's scheduler `get(dsk, keys)`: compute `keys` (nested lists give nested tuples)."""
        refs = _compute_refs(dsk, keys, callbacks, self.remote_options)
        flat = list(flatten(keys)) if isinstance(keys, list) else [keys]
        values = dict(zip(flat, rayx.get([refs[k] for k in flat]), strict=True))
        return _nested_get(keys, values)

    def get_refs(self, dsk: Any, keys: Any, *, callbacks: Any = None, **kwargs: Any) -> Any:
        """Like `get`, but return the ObjectRefs of the results, which stay in the store."""
        refs = _compute_refs(dsk, keys, callbacks, self.remote_options)
        return _nested_get(keys, refs)

    def persist(self, collections: Sequence[Any], optimize_graph: bool = True,
                **kwargs: Any) -> tuple:
        """Dask's persist protocol: the same collections, their data held in the object store."""
        def schedule(dsk: Any, keys: Any, **kw: Any) -> list:  # a plain function: no recursion
            refs = _compute_refs(dsk, keys, kw.get("callbacks"), self.remote_options)
            return [RayxDaskFuture(k, refs[k]) for k in keys]

        return dask.persist(*collections, scheduler=schedule, optimize_graph=optimize_graph,
                            traverse=False, **kwargs)


_default_client = RayxDaskClient()
get = _default_client.get
persist = _default_client.persist


def enable_dask_on_rayx(**remote_options: Any) -> Any:
    """Make rayx Dask's default scheduler; use as a call or as a `with` block."""
    scheduler = RayxDaskClient(**remote_options).get if remote_options else get
    return dask.config.set(scheduler=scheduler)


def disable_dask_on_rayx() -> None:
    """Give Dask back its own default scheduler."""
    dask.config.set(scheduler=None)


# --------------------------------------------------------------------------- the scheduler


def _compute_refs(dsk: Any, keys: Any, callbacks: Any, options: dict) -> dict[Key, ObjectRef]:
    """Submit what `keys` need and wait until it ran; returns the refs of the flat keys."""
    wanted = list(flatten(keys)) if isinstance(keys, list) else [keys]
    graph = _task_graph(dsk)
    order = _topological_order(graph, wanted)
    with local_callbacks(callbacks) as cbs:
        start, start_state, pretask, posttask, finish = unpack_callbacks(cbs)
        started: list = []
        state: dict = {}
        try:
            for cb in cbs:
                if cb[0]:
                    cb[0](graph)
                started.append(cb)
            events: queue.SimpleQueue = queue.SimpleQueue()
            refs = _submit(graph, order, events, options)
            state = _start_state(graph, order, refs)
            for f in start_state:
                f(graph, state)
            run = _Run(graph, state, refs, set(wanted), pretask, posttask)
            _run(run, events)
            result = {k: refs[k] for k in wanted}
        except BaseException:
            for cb in started:
                if cb[4]:
                    cb[4](graph, state, True)
            raise
        for cb in started:
            if cb[4]:
                cb[4](graph, state, False)
    return result


def _task_graph(dsk: Any) -> dict[Key, GraphNode]:
    """Any graph Dask hands a scheduler, as a dict of task-spec nodes."""
    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    return convert_legacy_graph(dsk)


def _topological_order(graph: dict[Key, GraphNode], wanted: list[Key]) -> list[Key]:
    """The keys `wanted` depends on, dependencies first; an explicit stack, no recursion."""
    order: list[Key] = []
    done: set[Key] = set()
    entered: set[Key] = set()
    for root in wanted:
        _add_persisted(graph, root)
        stack = [root]
        while stack:
            key = stack[-1]
            if key in done:
                stack.pop()
                continue
            if key not in entered:
                entered.add(key)
                missing = [d for d in graph[key].dependencies if d not in done]
                for dep in missing:
                    _add_persisted(graph, dep)
                    if dep in entered:
                        raise RuntimeError(f"cycle in the Dask graph through {dep!r}")
                stack.extend(missing)
                continue
            stack.pop()
            done.add(key)
            order.append(key)
    return order


def _add_persisted(graph: dict, key: Key) -> None:
    """A key outside the graph must be persisted data; KeyError if it is not."""
    if key not in graph:
        future = _PERSISTED.get(key)
        if future is None:
            raise KeyError(key)
        graph[key] = DataNode(key, future.ref)


def _submit(graph: dict, order: list[Key], events: queue.SimpleQueue,
            options: dict) -> dict[Key, ObjectRef]:
    """Send every task now, dependencies as refs; markers report completion on `events`."""
    refs: dict[Key, ObjectRef] = {}
    for key in order:
        node = graph[key]
        if isinstance(node, DataNode):
            value = node.value
            refs[key] = value if isinstance(value, ObjectRef) else rayx.put(value)
        elif isinstance(node, Alias):
            refs[key] = refs[node.target]
        else:
            deps = tuple(node.dependencies)
            remote = _REMOTE_TASK.options(**options, name=_task_name(key))
            refs[key], done = remote.remote(node, deps, *(refs[d] for d in deps))
            done.future().add_done_callback(lambda f, key=key: events.put((key, f)))
    return refs


def _task_name(key: Key) -> str:
    name = key[0] if isinstance(key, tuple) and key else key
    return f"dask:{name}"


def _start_state(graph: dict, order: list[Key], refs: dict[Key, ObjectRef]) -> dict:
    state: dict = {
        "dependencies": {}, "dependents": {k: set() for k in order}, "waiting": {},
        "waiting_data": {}, "cache": {}, "ready": [], "running": set(), "finished": set(),
        "released": set(),
    }
    for key in order:
        node = graph[key]
        deps = set(node.dependencies)
        state["dependencies"][key] = deps
        for dep in deps:
            state["dependents"][dep].add(key)
        if isinstance(node, DataNode):
            state["cache"][key] = refs[key]
        elif deps:
            state["waiting"][key] = set(deps)
    for key in order:
        if state["dependents"][key]:
            state["waiting_data"][key] = set(state["dependents"][key])
    for key in [k for k in order if k in state["cache"]]:  # data is there from the start
        for dep in state["dependents"][key]:
            state["waiting"][dep].discard(key)
    return state


@dataclass(slots=True)
class _Run:
    """One computation as this thread follows it; `state` is the part callbacks see."""

    graph: dict
    state: dict
    refs: dict  # key -> ObjectRef, until the key is released
    results: set
    pretask: list
    posttask: list
    early: dict = field(default_factory=dict)  # markers of keys whose deps are not in yet


def _run(run: _Run, events: queue.SimpleQueue) -> None:
    """Follow the markers until every submitted task finished; stop at the first error."""
    state = run.state
    try:
        with _cpu_lent():  # in a worker, this thread only waits from here on
            _advance(run, [(k, None) for k in run.refs
                           if k not in state["cache"] and not state["waiting"].get(k)])
            while state["running"] or state["waiting"]:
                key, marker = events.get()
                if key in state["running"]:
                    _advance(run, [(key, marker)], finished=True)
                else:
                    run.early[key] = marker
    except BaseException:
        _cancel_unfinished(state, run.refs)
        raise


def _advance(run: _Run, todo: list, finished: bool = False) -> None:
    """Start keys (or finish one); whatever that makes runnable is handled here too, iteratively.

    Aliases finish as soon as they start, and so do keys whose marker arrived early.
    """
    stack = [(key, marker, finished) for key, marker in todo]
    while stack:
        key, marker, is_done = stack.pop()
        if not is_done:
            _mark_running(run, key)
            if isinstance(run.graph[key], Alias):
                stack.append((key, None, True))
            elif key in run.early:
                stack.append((key, run.early.pop(key), True))
            continue
        for ready in _finish(run, key, marker):
            stack.append((ready, None, False))


def _mark_running(run: _Run, key: Key) -> None:
    run.state["waiting"].pop(key, None)
    run.state["running"].add(key)
    for f in run.pretask:
        f(key, run.graph, run.state)


def _finish(run: _Run, key: Key, marker: Future | None) -> list[Key]:
    """Record that key finished, release what no task needs any more; returns keys now ready."""
    if marker is not None and marker.exception() is not None:
        raise marker.exception()
    state = run.state
    state["running"].discard(key)
    state["finished"].add(key)
    state["cache"][key] = run.refs[key]
    for dep in state["dependencies"][key]:
        users = state["waiting_data"].get(dep)
        if users is not None:
            users.discard(key)
            if not users and dep not in run.results:
                del state["waiting_data"][dep]
                state["cache"].pop(dep, None)
                run.refs.pop(dep, None)
                state["released"].add(dep)
    for f in run.posttask:
        f(key, state["cache"][key], run.graph, state, None)
    ready = []
    for dependent in state["dependents"][key]:
        waiting = state["waiting"].get(dependent)
        if waiting is not None:
            waiting.discard(key)
            if not waiting:
                ready.append(dependent)
    return ready


def _cancel_unfinished(state: dict, refs: dict) -> None:
    """After an error, drop the tasks that have not run yet and interrupt the running ones."""
    for key in list(state["running"]) + list(state["waiting"]):
        if key in refs:
            with contextlib.suppress(Exception):
                rayx.cancel(refs[key])


_cpu_lent = api.cpu_lent


def _nested_get(keys: Any, values: Mapping) -> Any:
    """Lists of keys become tuples of values, at any depth (as dask.local.nested_get)."""
    if not isinstance(keys, list):
        return values[keys]
    out: list = []
    stack: list = [(keys, out)]
    while stack:
        ks, target = stack.pop()
        for k in ks:
            if isinstance(k, list):
                inner: list = []
                target.append(inner)
                stack.append((k, inner))
            else:
                target.append(values[k])
    return _tuples(out)


def _tuples(items: list) -> tuple:
    return tuple(_tuples(i) if isinstance(i, list) else i for i in items)


__all__ = [
    "RayxDaskClient", "RayxDaskFuture", "disable_dask_on_rayx", "enable_dask_on_rayx", "get",
    "persist",
]
