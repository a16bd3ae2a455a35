"""Resource accounting of one node, free of I/O: what is total, what is free, who holds what.

State (plain fields):
    total      resource name -> amount the node offers ("CPU", "GPU", "memory", custom)
    available  resource name -> amount not held by any lease; may dip below zero while a
               blocked worker that lent its CPU back takes it again
    gpu_free   per GPU id, the fraction of that GPU still free (fractional GPUs share one id)

The node manager drives it with acquire/release; tests drive it directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from rayx.exceptions import InvalidOptionError

EPS = 1e-9


@dataclass(slots=True)
class Allocation:
    """What one lease holds: amounts per resource and the GPU ids it was given."""

    amounts: dict[str, float]
    gpu_ids: list[int] = field(default_factory=list)
    gpu_share: float = 0.0  # per GPU id, the fraction this allocation holds


def validate_resources(resources: dict[str, float], what: str = "resources") -> dict[str, float]:
    """Check a resource request: names are strings, amounts non-negative numbers; GPUs whole
    numbers when more than one. Returns the request without zero entries."""
    if not isinstance(resources, dict):
        raise InvalidOptionError(f"{what} must be a dict of name -> amount, "
                                 f"got {type(resources).__name__}")
    out = {}
    for name, amount in resources.items():
        if not isinstance(name, str):
            raise InvalidOptionError(f"{what}: resource names must be strings, got {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise InvalidOptionError(f"{what}: amount of {name!r} must be a number, "
                            f"got {type(amount).__name__}")
        if amount < 0 or math.isnan(amount) or math.isinf(amount):
            raise InvalidOptionError(f"{what}: amount of {name!r} must be a finite number >= 0, "
                             f"got {amount}")
        if name == "GPU" and amount > 1 and amount != int(amount):
            raise InvalidOptionError(f"{what}: more than one GPU must be a whole number, "
                                     f"got {amount}")
        if amount > 0:
            out[name] = float(amount)
    return out


class ResourcePool:
    """Total and free resources of one node."""

    def __init__(self, total: dict[str, float], num_gpus: int):
        self.total = dict(total)
        self.available = dict(total)
        self.gpu_free = [1.0] * num_gpus

    def fits_total(self, request: dict[str, float]) -> bool:
        """Could the request ever fit on this node, if it were idle?"""
        if not all(self.total.get(k, 0.0) + EPS >= v for k, v in request.items()):
            return False
        gpus = request.get("GPU", 0.0)
        return gpus <= len(self.gpu_free) + EPS

    def fits_now(self, request: dict[str, float]) -> bool:
        if not all(self.available.get(k, 0.0) + EPS >= v for k, v in request.items()):
            return False
        return self._pick_gpus(request.get("GPU", 0.0)) is not None

    def _pick_gpus(self, gpus: float) -> list[int] | None:
        if gpus <= EPS:
            return []
        if gpus < 1:  # a fraction: the fullest GPU that still has room, to keep others whole
            fits = [i for i, f in enumerate(self.gpu_free) if f + EPS >= gpus]
            return [min(fits, key=lambda i: self.gpu_free[i])] if fits else None
        whole = [i for i, f in enumerate(self.gpu_free) if f >= 1 - EPS]
        n = int(round(gpus))
        return whole[:n] if len(whole) >= n else None

    def acquire(self, request: dict[str, float]) -> Allocation | None:
        """Take the request if it fits now; None if it does not."""
        if not self.fits_now(request):
            return None
        ids = self._pick_gpus(request.get("GPU", 0.0)) or []
        share = 0.0
        if ids:
            share = request["GPU"] / len(ids)
            for i in ids:
                self.gpu_free[i] -= share
        for k, v in request.items():
            self.available[k] = self.available.get(k, 0.0) - v
        return Allocation(dict(request), ids, share)

    def release(self, alloc: Allocation) -> None:
        for k, v in alloc.amounts.items():
            self.available[k] = self.available.get(k, 0.0) + v
        for i in alloc.gpu_ids:
            self.gpu_free[i] += alloc.gpu_share
        alloc.amounts, alloc.gpu_ids = {}, []

    def lend_cpu(self, alloc: Allocation) -> float:
        """A worker blocked in get gives its CPUs back for the time being; returns the amount."""
        cpus = alloc.amounts.get("CPU", 0.0)
        self.available["CPU"] = self.available.get("CPU", 0.0) + cpus
        return cpus

    def reclaim_cpu(self, cpus: float) -> None:
        """The blocked worker resumes and takes its CPUs again, even if that oversubscribes."""
        self.available["CPU"] = self.available.get("CPU", 0.0) - cpus
