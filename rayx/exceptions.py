"""The one exception hierarchy of rayx, rooted at RayxError.

Each class maps onto the standard exception it stands for where one exists, so code written for
concurrent.futures or plain Python catches rayx errors without knowing rayx.
"""

from __future__ import annotations

import concurrent.futures


class RayxError(Exception):
    """Root of every error rayx raises."""


class RayxSystemError(RayxError):
    """The runtime itself failed: a process did not start or a connection broke."""


class InvalidOptionError(RayxError, ValueError, TypeError):
    """An option or resource given to `remote`, `options` or `init` is unknown or malformed."""


class SerializationError(RayxError, TypeError):
    """A function, argument or value could not be pickled or unpickled."""


class RayxTaskError(RayxError):
    """A task raised; get() raises an instance of the original type that also subclasses this."""

    def __init__(self, function_name: str = "", traceback_str: str = "", cause=None):
        self.function_name = function_name
        self.traceback_str = traceback_str
        self.cause = cause
        Exception.__init__(self, self._message())  # not super(): the cause type may be next

    def _message(self) -> str:
        return f"{type(self.cause).__name__ if self.cause is not None else 'Error'} in task " \
               f"{self.function_name}:\n{self.traceback_str}"

    def as_instanceof_cause(self) -> BaseException:
        """Return an exception that is both this error and an instance of the cause's type."""
        cause = self.cause
        if cause is None or isinstance(cause, RayxError):
            return cause if cause is not None else self
        cause_cls = type(cause)
        try:
            dual = type(cause_cls.__name__, (RayxTaskError, cause_cls), {
                "__init__": _dual_init,
                "__str__": RayxTaskError.__str__,
                "__reduce__": RayxTaskError.__reduce__,
                "__module__": cause_cls.__module__,
                "__qualname__": cause_cls.__qualname__,
            })
            err = dual(self.function_name, self.traceback_str, cause)
        except TypeError:  # final classes, odd layouts: fall back to the plain wrapper
            return self
        return err

    def __str__(self) -> str:
        return self._message()

    def __reduce__(self):
        return (RayxTaskError, (self.function_name, self.traceback_str, self.cause))


def _dual_init(self, function_name, traceback_str, cause):
    RayxTaskError.__init__(self, function_name, traceback_str, cause)
    self.args = getattr(cause, "args", ())
    self.__dict__.update({k: v for k, v in getattr(cause, "__dict__", {}).items()
                          if k not in ("function_name", "traceback_str", "cause")})


class WorkerCrashedError(RayxError, concurrent.futures.BrokenExecutor):
    """The worker running a task died, and the task's retries are spent."""


class ActorDiedError(RayxError):
    """The actor is dead: killed, crashed past max_restarts, or its constructor failed."""


class ActorUnschedulableError(ActorDiedError):
    """The actor asks for resources no node can ever offer."""


class ObjectLostError(RayxError):
    """An object's every copy is gone and it cannot be rebuilt from lineage."""


class ObjectStoreFullError(RayxError, MemoryError):
    """An object is larger than the whole object store."""


class OwnerDiedError(ObjectLostError):
    """The process that owned an object exited, so the object is gone."""


class GetTimeoutError(RayxError, TimeoutError):
    """get() or wait() ran out of time before the objects were ready."""


class TaskCancelledError(RayxError, concurrent.futures.CancelledError):
    """The task was cancelled with rayx.cancel()."""


class TaskUnschedulableError(RayxError):
    """The task asks for resources no node of the cluster can ever offer."""


class ConnectionRefusedByClusterError(RayxError, PermissionError):
    """The cluster refused a call: the token is missing or wrong."""
