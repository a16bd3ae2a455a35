"""Validation of the options of remote functions and actors: bad input fails at the call."""

from __future__ import annotations

from dataclasses import dataclass

from rayx.exceptions import InvalidOptionError
from rayx.scheduler import validate_resources

TASK_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "memory", "num_returns", "max_retries",
    "retry_exceptions", "scheduling_strategy", "name", "max_calls",
    "_lease_group",  # (group id, n): at most n workers of the group's tasks at once (executors)
}
ACTOR_OPTIONS = {
    "num_cpus", "num_gpus", "resources", "memory", "name", "lifetime", "max_concurrency",
    "max_restarts", "max_task_retries", "scheduling_strategy", "get_if_exists", "namespace",
}
METHOD_OPTIONS = {"num_returns", "max_task_retries", "name"}


@dataclass(frozen=True, slots=True)
class NodeAffinitySchedulingStrategy:
    """Run on the node with this id (soft=True: elsewhere if that node is gone)."""

    node_id: str
    soft: bool = False


def check_options(options: dict, allowed: set[str], what: str) -> dict:
    """Reject unknown options and malformed values; return the options unchanged."""
    unknown = sorted(set(options) - allowed)
    if unknown:
        public = sorted(o for o in allowed if not o.startswith("_"))
        raise InvalidOptionError(f"unknown option(s) {unknown} for {what}; valid options are "
                                 f"{public}")
    for key in ("num_cpus", "num_gpus", "memory"):
        if key in options and options[key] is not None:
            validate_resources({_RES_NAME[key]: options[key]}, f"{key} of {what}")
    if options.get("resources") is not None:
        res = options["resources"]
        validate_resources(res, f"resources of {what}")
        for reserved in ("CPU", "GPU", "memory"):
            if reserved in res:
                raise InvalidOptionError(f"resources of {what}: use num_cpus=/num_gpus=/memory= "
                                         f"instead of resources={{'{reserved}': ...}}")
    _check_int(options, "num_returns", what, minimum=1)
    _check_int(options, "max_retries", what, minimum=-1)
    _check_int(options, "max_calls", what, minimum=0)
    _check_int(options, "max_restarts", what, minimum=-1)
    _check_int(options, "max_task_retries", what, minimum=-1)
    _check_int(options, "max_concurrency", what, minimum=1)
    group = options.get("_lease_group")
    if group is not None and not (isinstance(group, tuple) and len(group) == 2
                                  and isinstance(group[0], str) and isinstance(group[1], int)
                                  and group[1] >= 1):
        raise InvalidOptionError(f"_lease_group of {what} must be a (str, int >= 1) tuple, "
                                 f"got {group!r}")
    if "lifetime" in options and options["lifetime"] not in (None, "detached", "non_detached"):
        raise InvalidOptionError(f"lifetime of {what} must be None, 'detached' or "
                                 f"'non_detached', got {options['lifetime']!r}")
    strategy = options.get("scheduling_strategy")
    if strategy is not None and strategy not in ("DEFAULT", "SPREAD") and not isinstance(
            strategy, NodeAffinitySchedulingStrategy):
        raise InvalidOptionError(f"scheduling_strategy of {what} must be 'DEFAULT', 'SPREAD' or "
                                 f"a NodeAffinitySchedulingStrategy, got {strategy!r}")
    retry = options.get("retry_exceptions")
    if retry is not None and not isinstance(retry, bool) and not (
            isinstance(retry, (list, tuple))
            and all(isinstance(t, type) and issubclass(t, BaseException) for t in retry)):
        raise InvalidOptionError(f"retry_exceptions of {what} must be a bool or a list of "
                                 f"exception types, got {retry!r}")
    return options


_RES_NAME = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def _check_int(options: dict, key: str, what: str, minimum: int) -> None:
    if key not in options or options[key] is None:
        return
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(f"{key} of {what} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InvalidOptionError(f"{key} of {what} must be >= {minimum}, got {value}")


def resource_request(options: dict, default_cpus: float) -> dict:
    """The resource amounts a task or actor asks for."""
    req = {"CPU": options.get("num_cpus", default_cpus) if options.get("num_cpus") is not None
           else default_cpus,
           "GPU": options.get("num_gpus") or 0,
           "memory": options.get("memory") or 0}
    req.update(options.get("resources") or {})
    return {k: float(v) for k, v in req.items() if v}


def strategy_fields(options: dict) -> tuple[str, str]:
    """(strategy name, node affinity) as they travel in lease requests."""
    s = options.get("scheduling_strategy")
    if isinstance(s, NodeAffinitySchedulingStrategy):
        return ("DEFAULT" if s.soft else "AFFINITY"), s.node_id
    return (s or "DEFAULT"), ""
