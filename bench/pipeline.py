"""The parent side: each case in its own process, one measuring at a time, the next one
starting while the last one shuts down.

    case N-1:  |measured|  shutdown, leak checks, exit
    case N:     (waits)   start, warm-up .....(waits)  |measured rounds|  shutdown ...
    case N+1:             interpreter, imports, (waits idle) ..........   start, warm-up ...
                         ^ "over" from N-1     ^ turn to N             ^ "over" from N

A case process measures only in its turn (`harness.Turn`): it waits for the turn before its
first measured round (a fresh-process run, before it starts anything), and the turn comes when
the process before it has exited and been checked for leftover processes and shared memory,
and the process after it has imported its modules and waits, idle (blocked on a pipe). A case
process says when its measurements are over (its system begins to shut down); the next case
starts its system then, beside that shutdown, and the case after that starts its interpreter
and imports. None of that is measured, and no measured round shares the machine with another
case's work. Each system still starts afresh in its own process for every workload.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from bench import harness, procs
from bench.harness import ROOT, Case, CaseResult, Workload, missing_requirement


@dataclass
class Run:
    """One process to start: a case, or one new-interpreter run of a `fresh` case."""

    workload: Workload
    case: Case
    params: dict
    log_path: str
    log_mode: str  # "w" for a case's first process, "a" after it
    fresh: bool
    job: Job | None = None  # whose failure skips the runs of it not yet started


@dataclass
class Job:
    """One case of a workload (one pass of it when the workload runs in passes)."""

    workload: Workload
    case: Case
    quick: bool
    log_dir: str
    passes: int = 1
    pass_no: int = 1  # which of the passes this job is
    skipped: str | None = None
    runs: list[Run] = field(default_factory=list)
    failed: bool = False  # a run of it failed: its runs not yet started are skipped
    warmup_runs: int = 0  # of a fresh case: the first runs, whose figures are dropped

    def __post_init__(self) -> None:
        self.skipped = missing_requirement(self.case)
        if self.skipped:
            return
        params = self.workload.params(self.quick)
        if self.passes > 1:
            params["repeats"] = max(1, -(-int(params["repeats"]) // self.passes))
        log_path = os.path.join(self.log_dir, f"{self.workload.name}.{self.case.system}.log")
        if self.workload.fresh:  # a new interpreter per round, the warm-up rounds first
            one = dict(params, warmup=0, repeats=1)
            count, self.warmup_runs = params["warmup"] + params["repeats"], params["warmup"]
        else:
            one, count, self.warmup_runs = params, 1, 0
        for i in range(count):
            mode = "w" if i == 0 and self.pass_no == 1 else "a"
            self.runs.append(Run(self.workload, self.case, one, log_path, mode,
                                 self.workload.fresh, self))

    def result(self, outs: list[dict], wall: float) -> CaseResult:
        """The case's result from its processes' outcomes (the warm-up runs' figures dropped)."""
        res = CaseResult(self.workload.name, self.case.system, "ok", wall=wall)
        if self.skipped:
            res.status, res.message = "skipped", self.skipped
            return res
        for i, out in enumerate(outs):
            res.leaks += out.get("leaks", [])
            if out.get("status", "error") != "ok" and res.status == "ok":
                res.status, res.message = out.get("status", "error"), out.get("message", "")
            if i < self.warmup_runs:
                continue
            res.info.update(out.get("info", {}))
            for key, values in out.get("metrics", {}).items():
                res.metrics.setdefault(key, []).extend(values)
        if res.status == "error":
            res.message = (res.message + "\n" + _tail(self.runs[0].log_path)).strip()
        return res


class Child:
    """A case process. It is started at once and imports its modules; then, each on the
    harness's word, it starts its system (`start`) and takes its measurements (`give_turn`);
    `wait_ready` and `wait_over` wait for its side of the exchange."""

    def __init__(self, run: Run):
        self.run = run
        self.got: set[bytes] = set()  # what it has said so far
        self.t0 = time.perf_counter()  # both reset by start(); until then they bound its
        self.deadline = time.monotonic() + run.params["timeout"]  # interpreter and imports
        self.tmp = tempfile.mkdtemp(prefix="rayx-bench-")
        self.out = os.path.join(self.tmp, "result.json")
        down_r, self._down = os.pipe()
        self._up, up_w = os.pipe()
        spec = {"module": run.workload.module, "func": run.case.func, "params": run.params,
                "out": self.out, "strict_shm": run.case.system == "rayx", "fresh": run.fresh,
                "preload": list(run.case.requires), "down_fd": down_r, "up_fd": up_w}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        env.setdefault("RAY_DEDUP_LOGS", "0")
        self.log = open(run.log_path, run.log_mode)  # noqa: SIM115 - closed in finish()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.child", json.dumps(spec)], cwd=ROOT, env=env,
                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                pass_fds=(down_r, up_w))
        finally:
            os.close(down_r)
            os.close(up_w)

    def wait_ready(self) -> None:
        """Until its imports are done and it waits to start (or it has exited)."""
        self._wait_for(harness.READY)

    def start(self) -> None:
        """Let it start its system; its time limit (and its wall time) count from now, not
        from its spawn: it may have waited idle through a long case before it."""
        self.t0 = time.perf_counter()
        self.deadline = time.monotonic() + self.run.params["timeout"]
        self._send(harness.START)

    def give_turn(self) -> None:
        self._send(harness.TURN_GIVEN)

    def wait_over(self) -> None:
        """Until its measurements are over (or it has exited, or its time is up)."""
        self._wait_for(harness.OVER)

    def _wait_for(self, what: bytes) -> None:
        while what not in self.got and b"" not in self.got:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._up], [], [], left)[0]:
                return  # its time is up: finish() kills it
            self.got.add(os.read(self._up, 1))  # b"" at its exit

    def _send(self, what: bytes) -> None:
        try:
            os.write(self._down, what)
        except BrokenPipeError:  # it has exited already; finish() tells how
            pass

    def finish(self) -> tuple[dict, float]:
        """Wait for the process to exit (killing it at its deadline), check what it left
        behind, and return its outcome and its wall time."""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
            out = self._read()
        except subprocess.TimeoutExpired:
            self.kill()
            out = {"status": "error",
                   "message": f"timed out after {self.run.params['timeout']} s"}
        finally:
            for fd in (self._down, self._up):
                os.close(fd)
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return out, time.perf_counter() - self.t0

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the child's own process group
        except ProcessLookupError:
            pass
        self.proc.wait()

    def _read(self) -> dict:
        try:
            with open(self.out) as f:
                result = json.load(f)
        except (OSError, ValueError):
            return {"status": "error", "message": f"child exited with {self.proc.returncode}"}
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
        for path in shm_left:  # files this case's system made, still there after its driver
            result.setdefault("leaks", []).append(f"shared memory after exit: {path}")
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        return result


class NotRun:
    """A run left out because an earlier run of its case failed: the same calls as a Child,
    none of which does anything."""

    def __init__(self, run: Run):
        self.run = run

    def wait_ready(self) -> None:
        pass

    start = give_turn = wait_over = kill = wait_ready

    def finish(self) -> tuple[dict, float]:
        return {"status": "error", "message": "not run: an earlier run of this case failed"}, 0.0


def execute(runs: Iterable[Run], overlap: bool = True,
            before_start: Callable[[], None] | None = None) -> Iterator[tuple[dict, float]]:
    """Run each process in turn; yield each one's (outcome, wall time) in order.

    With `overlap` (see the diagram above), a case's system starts when the last case's
    measurements are over, and the process after it is started then too; a case measures
    once the last one has exited and the next one waits, its imports done. Without, each
    process starts when the last one has exited (`before_start` is called first)."""
    pending = iter(runs)
    live: list[Child | NotRun] = []

    def spawn() -> Child | NotRun | None:
        run = next(pending, None)
        if run is None:
            return None
        if run.job is not None and run.job.failed:
            live.append(NotRun(run))
            return live[-1]
        if before_start is not None and not overlap:
            before_start()
        live.append(Child(run))
        return live[-1]

    def finish(child: Child | NotRun) -> tuple[dict, float]:
        live.remove(child)
        return child.finish()

    try:
        prev, cur = None, spawn()
        while cur is not None:
            cur.wait_ready()
            cur.start()  # beside the last case's shutdown
            nxt = spawn() if overlap else None  # its imports beside both
            done = finish(prev) if prev is not None else None
            if nxt is not None:
                nxt.wait_ready()
            cur.give_turn()
            if done is not None:
                yield done
            if overlap:
                cur.wait_over()
                prev, cur = cur, nxt
            else:
                yield finish(cur)
                cur = spawn()
        if prev is not None:
            yield finish(prev)
    finally:  # stopped early (an interrupt): no case process outlives the run
        for child in list(live):
            child.kill()
            finish(child)


def run_jobs(jobs: list[Job], overlap: bool = True,
             before_start: Callable[[], None] | None = None) -> Iterator[CaseResult]:
    """Each job's result, in order, as soon as its last process has been checked."""
    outcomes = execute((run for job in jobs for run in job.runs), overlap, before_start)
    for job in jobs:
        done = []
        for _ in job.runs:
            done.append(next(outcomes))
            if done[-1][0].get("status", "error") != "ok":
                job.failed = True  # runs after the next ones already started are not run
        yield job.result([out for out, _ in done], sum(wall for _, wall in done))


def run_case(workload: Workload, case: Case, quick: bool, log_dir: str,
             passes: int = 1) -> CaseResult:
    """One case (with `passes` > 1, one pass of it: its share of the rounds) on its own."""
    return next(run_jobs([Job(workload, case, quick, log_dir, passes)]))


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""
