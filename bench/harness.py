"""The common harness: workloads, the runner each case gets, and one fresh process per case.

A *workload* (say `noop_tasks`) has metrics and one *case* per system (rayx, ray, dask, ...).
Each case runs in its own new Python process (`python -m bench.child`), which starts the
system, warms up, repeats, shuts the system down and checks that no process it spawned is left.
Workloads marked `fresh` (start-up) run every repetition in a new process instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
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
        `warmup` and `repeats` override the workload's counts for this measurement alone."""
        for _ in range(self.warmup if warmup is None else warmup):
            once()
        for _ in range(self.repeats if repeats is None else repeats):
            for key, value in once().items():
                self.record(key, value)
        self.note_processes()

    def peak_memory(self, fn: Callable[[], object], key: str) -> None:
        """Run `fn` once while sampling whole-system memory; record the peak in MB."""
        with procs.PeakSampler(self.shm) as sampler:
            fn()
        self.seen |= sampler.seen
        self.record(key, sampler.peak / procs.MB)

    def memory(self) -> dict:
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


def _run_child(workload: Workload, case: Case, params: dict, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="rayx-bench-") as tmp:
        out = os.path.join(tmp, "result.json")
        spec = {"module": workload.module, "func": case.func, "params": params, "out": out,
                "strict_shm": case.system == "rayx"}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env.setdefault("RAY_DEDUP_LOGS", "0")
        proc = subprocess.Popen([sys.executable, "-m", "bench.child", json.dumps(spec)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            proc.wait(timeout=params["timeout"])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own process group
            proc.wait()
            return {"status": "error", "message": f"timed out after {params['timeout']} s"}
        try:
            with open(out) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return {"status": "error", "message": f"child exited with {proc.returncode}"}
    seen = {(pid, created) for pid, created in result.pop("seen", [])}
    stragglers = procs.still_alive(seen, grace=5.0)
    if stragglers:  # outlived the child process itself
        result.setdefault("leaks", []).extend(
            "after exit: " + procs.describe(p) for p in stragglers)
        procs.kill_all(stragglers)
    deadline = time.monotonic() + 5.0
    shm_left = [p for p in result.pop("shm_left", []) if p.startswith("/dev/shm/")]
    while shm_left and time.monotonic() < deadline:
        time.sleep(0.1)
        shm_left = [p for p in shm_left if os.path.exists(p)]
    for path in shm_left:  # files this case's system made, still there after its driver exited
        result.setdefault("leaks", []).append(f"shared memory after exit: {path}")
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    return result


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_case(workload: Workload, case: Case, quick: bool, log_dir: str,
             passes: int = 1) -> CaseResult:
    """One case in a fresh process; with `passes` > 1, one pass of it: its share of the
    rounds, after the warm-up (the log is appended to)."""
    res = CaseResult(workload.name, case.system, "ok")
    why = missing_requirement(case)
    if why:
        res.status, res.message = "skipped", why
        return res
    params = workload.params(quick)
    if passes > 1:
        params["repeats"] = max(1, -(-int(params["repeats"]) // passes))
    log_path = os.path.join(log_dir, f"{workload.name}.{case.system}.log")
    t0 = time.perf_counter()
    with open(log_path, "a" if passes > 1 else "w") as log:
        if workload.fresh:
            runs = params["warmup"] + params["repeats"]
            child_params = dict(params, warmup=0, repeats=1)
            outs = []
            for _ in range(runs):
                outs.append(_run_child(workload, case, child_params, log))
                if outs[-1].get("status") != "ok":
                    break
            merged: dict = {"status": "ok", "metrics": {}, "leaks": [], "info": {}}
            for o in outs:
                merged["leaks"] += o.get("leaks", [])
                if o.get("status") != "ok":
                    merged.update(status=o["status"], message=o.get("message", ""))
            for o in outs[params["warmup"]:]:
                merged["info"].update(o.get("info", {}))
                for k, v in o.get("metrics", {}).items():
                    merged["metrics"].setdefault(k, []).extend(v)
            out = merged
        else:
            out = _run_child(workload, case, params, log)
    res.wall = time.perf_counter() - t0
    res.status = out.get("status", "error")
    res.metrics = out.get("metrics", {})
    res.message = out.get("message", "")
    res.leaks = out.get("leaks", [])
    res.info = out.get("info", {})
    if res.status == "error":
        res.message = (res.message + "\n" + _tail(log_path)).strip()
    return res


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
