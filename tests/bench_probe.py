"""A workload for tests/test_bench.py: its case notes when it starts, measures and shuts down,
so the test can check which of the harness's case processes ran beside which."""

from __future__ import annotations

import os
import time

from bench.harness import Runner, measurements_over


def note(r: Runner, what: str) -> None:
    with open(r.p["log"], "a") as f:
        f.write(f"{os.getpid()} {what} {time.time()!r}\n")


def probe(r: Runner) -> None:
    note(r, "start")
    if r.p.get("fail"):
        raise ValueError("the probe was told to fail")

    def once() -> dict[str, float]:
        note(r, "round")
        time.sleep(r.p.get("work", 0))
        return {"x": 1.0}

    r.measure(once)
    note(r, "over")
    measurements_over()
    if r.p.get("late"):  # a measurement the next case's start may overlap: refused
        r.measure(once)
    time.sleep(r.p["shutdown"])  # a slow shutdown, which the next case may start beside
    note(r, "exit")
