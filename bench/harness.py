"""The common harness: workloads, and the runner each case gets in its own process.

A *workload* (say `noop_tasks`) has metrics and one *case* per system (rayx, ray, dask, ...).
Each case runs in its own new Python process (`python -m bench.child`, started by
bench/pipeline.py), which starts the system, warms up, waits for its turn, repeats, shuts the
system down and checks that no process it spawned is left. Workloads marked `fresh`
(start-up) run every repetition in a new process instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench import procs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NCPU = os.cpu_count() or 1
MODULES = ["startup", "tasks", "actors", "objects", "sklearn_jobs", "executor_map",
           "dask_workloads", "multinode"]


class Skip(Exception):
    """Raised by a case that cannot run here (an optional package or feature is missing)."""


@dataclass(frozen=True)
class Target:
    """A goal for rayx: `rayx / peer <op> value`, or `rayx <op> value` when peer is None."""

    peer: str | None
    op: str  # "<=", ">=", "<"
    value: float
    text: str

    def check(self, rayx: float, peer: float | None) -> tuple[float, bool] | None:
        if self.peer is not None:
            if peer is None or peer == 0:
                return None
            x = rayx / peer
        else:
            x = rayx
        ok = {"<=": x <= self.value, ">=": x >= self.value, "<": x < self.value}[self.op]
        return x, ok


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = False
    targets: tuple[Target, ...] = ()


@dataclass(frozen=True)
class Case:
    system: str
    func: str  # function name in the workload's module
    requires: tuple[str, ...] = ()  # top-level modules that must be importable


@dataclass
class Workload:
    name: str
    title: str
    metrics: list[Metric]
    cases: list[Case]
    full: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    fresh: bool = False  # a new process for every repetition (start-up measurements)
    module: str = ""
    notes: str = ""
    # >1: the cases run in that many passes (rayx, ray, ..., rayx, ray, ...), each pass a
    # fresh process per case doing its share of the rounds, and the samples are pooled, so
    # a drift of the machine's speed during the workload reaches every system alike
    passes: int = 1

    def passes_for(self, quick: bool) -> int:
        return 1 if quick or self.fresh else self.passes

    def params(self, quick: bool) -> dict:
        p = {"warmup": 1, "repeats": 5, "timeout": 420}
        p.update(self.full)
        if quick:
            p.update({"repeats": 3, "timeout": 180})
            p.update(self.quick)
        return p


def all_workloads() -> list[Workload]:
    out = []
    for name in MODULES:
        mod = importlib.import_module(f"bench.{name}")
        for w in mod.WORKLOADS:
            w.module = f"bench.{name}"
            out.append(w)
    return out


# ---------------------------------------------------------------- child side


# the turn-taking of bench/pipeline.py, one byte each way
READY, START, TURN_GIVEN, OVER = b"r", b"s", b"t", b"o"


class Turn:
    """A case process's side of the turn-taking in bench/pipeline.py: it starts its system
    when told, measures only in its turn, and says when its imports are done and when its
    measurements are over. Outside a harness-started process (no pipes) all are no-ops."""

    def __init__(self) -> None:
        self._down: int | None = None
        self._up: int | None = None
        self.over = False

    def attach(self, down_fd: int | None, up_fd: int | None) -> None:
        self._down, self._up = down_fd, up_fd
        for fd in (down_fd, up_fd):
            if fd is not None:  # not passed on to the system's own processes
                os.set_inheritable(fd, False)

    def ready(self) -> None:
        """Say the imports are done, and wait for the word to start the system."""
        self._send(READY)
        self._receive()

    def wait(self) -> None:
        """Block until the process before this one has exited and been checked."""
        if self.over:
            raise RuntimeError("a measurement after measurements_over(): the next case's "
                               "process may be running beside it")
        self._receive()
        if self._down is not None:
            os.close(self._down)
            self._down = None

    def end(self) -> None:
        """Tell the harness this process will measure nothing more (idempotent)."""
        self.over = True
        self._send(OVER)
        if self._up is not None:
            os.close(self._up)
            self._up = None

    def _send(self, what: bytes) -> None:
        if self._up is not None:
            try:
                os.write(self._up, what)
            except BrokenPipeError:
                pass

    def _receive(self) -> None:
        if self._down is not None:
            os.read(self._down, 1)  # the byte expected, or end of file if the harness is gone


TURN = Turn()


def measurements_over() -> None:
    """Called as a case's system begins to shut down: the next case may start its process."""
    TURN.end()


class Runner:
    """What a case function gets: its parameters, and ways to time and to record."""

    def __init__(self, params: dict):
        self.p = params
        self.warmup = int(params["warmup"])
        self.repeats = int(params["repeats"])
        self.results: dict[str, list[float]] = {}
        self.info: dict[str, object] = {}
        self.shm: list[str] = []  # /dev/shm globs the system keeps unmapped objects under
        self.seen: set[tuple[int, float]] = set()

    def record(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(float(value))

    def measure(self, once: Callable[[], dict[str, float]], warmup: int | None = None,
                repeats: int | None = None) -> None:
        """Run `once` warmup times (discarded), then `repeats` times, recording what it returns.
        `warmup` and `repeats` override the workload's counts for this measurement alone.
        The warm-up may run beside the last case's shutdown; the measured rounds wait their turn."""
        for _ in range(self.warmup if warmup is None else warmup):
            once()
        TURN.wait()
        for _ in range(self.repeats if repeats is None else repeats):
            for key, value in once().items():
                self.record(key, value)
        self.note_processes()

    def peak_memory(self, fn: Callable[[], object], key: str) -> None:
        """Run `fn` once while sampling whole-system memory; record the peak in MB."""
        TURN.wait()
        with procs.PeakSampler(self.shm) as sampler:
            fn()
        self.seen |= sampler.seen
        self.record(key, sampler.peak / procs.MB)

    def memory(self) -> dict:
        TURN.wait()
        self.note_processes()
        return procs.tree_memory(self.shm)

    def note_processes(self) -> None:
        self.seen |= procs.snapshot()


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- parent side


@dataclass
class CaseResult:
    workload: str
    system: str
    status: str  # ok | skipped | error
    metrics: dict[str, list[float]] = field(default_factory=dict)
    message: str = ""
    leaks: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    wall: float = 0.0


def missing_requirement(case: Case) -> str | None:
    for name in case.requires:
        try:
            if importlib.util.find_spec(name) is None:
                return f"{name} is not installed"
        except (ImportError, ValueError):
            return f"{name} is not importable"
    return None


def merge(into: CaseResult | None, more: CaseResult) -> CaseResult:
    """Pool a later pass of a case into the earlier ones: samples, leaks, time, status."""
    if into is None:
        return more
    for key, values in more.metrics.items():
        into.metrics.setdefault(key, []).extend(values)
    into.leaks += more.leaks
    into.info.update(more.info)
    into.wall += more.wall
    if into.status == "ok" and more.status != "ok":
        into.status, into.message = more.status, more.message
    return into


def summarize(values: list[float]) -> dict | None:
    if not values:
        return None
    v = sorted(values)
    med = statistics.median(v)
    if len(v) >= 5:
        q = statistics.quantiles(v, n=4, method="inclusive")
        lo, hi, kind = q[0], q[2], "IQR"
    else:
        lo, hi, kind = v[0], v[-1], "range"
    return {"median": med, "lo": lo, "hi": hi, "kind": kind, "n": len(v)}


def select(workloads: list[Workload], only: list[str], systems: list[str]) -> list[Workload]:
    """`only` holds workload names (or prefixes); `systems` limits the cases run."""
    chosen = []
    for w in workloads:
        if only and not any(w.name == o or w.name.startswith(o) for o in only):
            continue
        cases = [c for c in w.cases if not systems or c.system in systems]
        if cases:
            chosen.append(Workload(**{**w.__dict__, "cases": cases}))
    return chosen
