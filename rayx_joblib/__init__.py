"""joblib on rayx: `import rayx_joblib`, then `with joblib.parallel_backend("rayx"): ...`."""

import joblib

from rayx_joblib.backend import LARGE_ARGUMENT_BYTES, RayxBackend


def register() -> None:
    """Make 'rayx' a joblib backend name (done on import; calling again is harmless)."""
    joblib.register_parallel_backend("rayx", RayxBackend)


register()

__all__ = ["LARGE_ARGUMENT_BYTES", "RayxBackend", "register"]
