"""`concurrent.futures` on rayx: `RayxExecutor().map(...)` runs each call as a rayx task."""

from rayx_futures.executor import BrokenRayxExecutor, RayxExecutor, RayxFuture

__all__ = ["BrokenRayxExecutor", "RayxExecutor", "RayxFuture"]
