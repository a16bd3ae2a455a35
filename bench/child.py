"""One case in a fresh process: `python -m bench.child '<json spec>'` (started by the harness).

The spec names the workload module, the case function and its parameters, and the file to
write the result to. After the case returns (it shuts its system down itself), every process
it spawned must be gone within a few seconds; any that stays is reported as a leak and killed.
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import sys
import traceback

from bench import procs
from bench.harness import TURN, Runner, Skip


def preload(modules: list[str]) -> None:
    """Import the case's packages before its system starts, beside the cases before it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the case itself reports what is missing
            pass


def main(spec: dict) -> dict:
    procs.become_subreaper()
    runner = Runner(spec["params"])
    TURN.attach(spec.get("down_fd"), spec.get("up_fd"))
    result: dict = {"status": "ok"}
    try:
        func = getattr(importlib.import_module(spec["module"]), spec["func"])
        if not spec.get("fresh"):  # a fresh run's clock starts before its imports
            preload(spec.get("preload", []))
        TURN.ready()
        if spec.get("fresh"):  # the whole run is the measurement: nothing may run beside it
            TURN.wait()
        func(runner)
    except Skip as exc:
        result = {"status": "skipped", "message": str(exc)}
    except BaseException as exc:  # report, and still check for leaks
        traceback.print_exc()
        result = {"status": "error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    TURN.end()  # for cases whose system has no shutdown that says so
    runner.note_processes()  # the lingering helpers too: the harness checks them after exit
    left = procs.wait_gone(timeout=15)
    leaks = [procs.describe(p) for p in left]
    procs.kill_all(left)
    shm_left = sorted({path for pattern in runner.shm for path in glob.glob(pattern)})
    if spec.get("strict_shm"):  # rayx promises its shutdown() leaves no shared memory behind
        leaks += [f"shared memory left after shutdown(): {path}" for path in shm_left]
    result.update(metrics=runner.results, info=runner.info, leaks=leaks, shm_left=shm_left,
                  seen=sorted(runner.seen))
    return result


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    out = main(spec)
    with open(spec["out"], "w") as f:
        json.dump(out, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait for non-daemon threads a system may have left behind
