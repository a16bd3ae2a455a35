"""@rayx.remote on a function: RemoteFunction, its options and the submit path."""

from __future__ import annotations

from rayx import api, ids, serialization
from rayx.object_ref import ObjectRef
from rayx.options import TASK_OPTIONS, check_options, resource_request, strategy_fields
from rayx.task_spec import TaskSpec


class RemoteFunction:
    """A function that runs as a task: `f.remote(...)` returns ObjectRef(s) at once."""

    def __init__(self, fn, options: dict):
        if not callable(fn):
            raise TypeError(f"@rayx.remote needs a function or class, got {fn!r}")
        self._fn = fn
        self._name = getattr(fn, "__qualname__", repr(fn))
        self._options = check_options(dict(options), TASK_OPTIONS, f"remote function {self._name}")
        self._fn_id = ids.new_id()
        self._fn_bytes: bytes | None = None
        self._fixed: _Fixed | None = None  # worked out at the first call
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", self._name)

    def __call__(self, *args, **kwargs):
        raise TypeError(f"remote function {self._name} cannot be called directly; "
                        f"use {self.__name__}.remote(...)")

    def __reduce__(self):
        return (RemoteFunction, (self._fn, self._options))

    def options(self, **options) -> _OptionsBound:
        """Override options for the calls made through the returned object."""
        check_options(options, TASK_OPTIONS, f"remote function {self._name}")
        return _OptionsBound(self, {**self._options, **options})

    def remote(self, /, *args, **kwargs):
        if self._fixed is None:
            self._fixed = _Fixed.of(self._options, self._name)
        return self._submit(args, kwargs, self._fixed)

    def _submit(self, args, kwargs, fixed: _Fixed):
        core = api.core()
        if self._fn_bytes is None:
            self._fn_bytes = serialization.dumps(self._fn)
        enc_args, enc_kwargs, deps, nested = encode_args(core, args, kwargs)
        task_id = ids.new_id()
        spec = TaskSpec(
            task_id=task_id, name=fixed.name, args=enc_args, kwargs=enc_kwargs,
            return_ids=[f"{task_id}{i:02x}" for i in range(fixed.num_returns)],
            owner_id=core.client_id, owner_address=core.address, fn_id=self._fn_id,
            fn_bytes=self._fn_bytes, resources=dict(fixed.resources),
            max_retries=fixed.max_retries, retry_exceptions=fixed.retry_exceptions,
            strategy=fixed.strategy, node_affinity=fixed.affinity, max_calls=fixed.max_calls,
            lease_group=fixed.lease_group)
        refs = core.submit(spec, deps, nested)
        return refs[0] if fixed.num_returns == 1 else refs


class _Fixed:
    """What every call made with one set of options puts into its TaskSpec, worked out once:
    a map() makes thousands of calls through one _OptionsBound."""

    __slots__ = ("name", "num_returns", "resources", "max_retries", "retry_exceptions",
                 "strategy", "affinity", "max_calls", "lease_group")

    @classmethod
    def of(cls, options: dict, default_name: str) -> _Fixed:
        f = cls()
        f.name = options.get("name") or default_name
        f.num_returns = options.get("num_returns") or 1
        f.resources = resource_request(options, 1.0)
        f.max_retries = _retries(options.get("max_retries"), 3)
        f.retry_exceptions = _retry_exc(options.get("retry_exceptions"))
        f.strategy, f.affinity = strategy_fields(options)
        f.max_calls = options.get("max_calls") or 0
        f.lease_group = options.get("_lease_group") or ()
        return f


class _OptionsBound:
    def __init__(self, fn: RemoteFunction, options: dict):
        self._fn, self._options = fn, options
        self._fixed = _Fixed.of(options, fn._name)

    def remote(self, /, *args, **kwargs):
        return self._fn._submit(args, kwargs, self._fixed)


def _retries(value, default: int) -> int:
    if value is None:
        return default
    return 10**9 if value < 0 else value


def _retry_exc(value):
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return bool(value)


def encode_args(core, args, kwargs) -> tuple[list, dict, list[ObjectRef], list[ObjectRef]]:
    """Encode arguments for a task: top-level refs become dependencies, large values go into
    the object store once. Returns (args, kwargs, top-level refs, refs nested in values), the
    last two to pin while the task runs. Raises before anything is sent."""
    deps: list[ObjectRef] = []

    def enc(value):
        if isinstance(value, ObjectRef):
            deps.append(value)
            return ["r", value.id, value.owner_address, None]
        so = serialization.serialize(value)
        if so.size <= core.settings.inline_threshold:
            return ("v", so.to_bytes())
        oid = ids.new_id()
        core.table.add_owned(oid, core.address, core.store_serialized(oid, so))
        ref = core.new_ref(oid)
        deps.append(ref)
        return ["r", oid, core.address, None]

    with serialization.collect_refs() as nested:
        enc_args = [enc(a) for a in args]
        enc_kwargs = {k: enc(v) for k, v in kwargs.items()}
    return enc_args, enc_kwargs, deps, nested
