"""The benchmark harness itself: a small run end to end, and a missing peer skipped cleanly.

Timings are not asserted (they are measured, never tested); only that the harness runs each
system in its own process and reports medians and ratios."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import harness, pipeline

from .conftest import REPO


@pytest.mark.timeout(300)
def test_quick_round_trip_run_reports_rayx_and_the_pipe_limit(tmp_path):
    out = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "round_trip",
                           "--systems", "rayx,pipe", "--json", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads(out.read_text())
    rows = {r["system"]: r for r in saved["results"]}
    assert set(rows) == {"rayx", "pipe"}
    for r in rows.values():
        assert r["status"] == "ok", r["message"]
        assert r["leaks"] == []
        assert all(v > 0 for samples in r["metrics"].values() for v in samples)
    assert "rayx / system" in proc.stdout and "pipe" in proc.stdout


def test_a_peer_that_is_not_installed_is_skipped(tmp_path):
    workload = next(w for w in harness.all_workloads() if w.name == "round_trip")
    case = harness.Case("absent", "rayx_round_trip", ("rayx_no_such_peer_module",))
    res = pipeline.run_case(workload, case, True, str(tmp_path))
    assert res.status == "skipped" and "rayx_no_such_peer_module" in res.message


@pytest.mark.timeout(120)
def test_passes_pool_their_rounds_into_one_row(tmp_path):
    """A workload run in passes gives each pass its share of the rounds in a fresh process
    and pools the samples: 5 rounds over 2 passes are 3 + 3 samples, one row per system."""
    workload = next(w for w in harness.all_workloads() if w.name == "round_trip")
    workload = harness.Workload(**{**workload.__dict__, "passes": 2,
                                   "full": {**workload.full, "calls": 200}})
    assert workload.passes_for(quick=True) == 1 and workload.passes_for(quick=False) == 2
    case = next(c for c in workload.cases if c.system == "pipe")
    pooled = None
    for _ in range(2):
        one = pipeline.run_case(workload, case, False, str(tmp_path), passes=2)
        assert one.status == "ok", one.message
        assert len(one.metrics["rtt_median"]) == 3
        pooled = harness.merge(pooled, one)
    assert len(pooled.metrics["rtt_median"]) == 6 and pooled.status == "ok"
    failed = harness.CaseResult("round_trip", "pipe", "error", message="boom")
    assert harness.merge(pooled, failed).status == "error"


def _probe_jobs(tmp_path, count: int, fresh: bool = False, **params) -> list[pipeline.Job]:
    full = {"log": str(tmp_path / "notes"), "shutdown": 1.0, "warmup": 0, "repeats": 2,
            "timeout": 60, **params}
    workload = harness.Workload("probe", "probe", [], [harness.Case("probe", "probe")],
                                full=full, fresh=fresh, module="tests.bench_probe")
    return [pipeline.Job(workload, workload.cases[0], False, str(tmp_path))
            for _ in range(count)]


def _notes(tmp_path) -> list[dict[str, float]]:
    """Each process's notes (first time of each kind), in the order the processes started."""
    by_pid: dict[str, dict[str, float]] = {}
    for line in (tmp_path / "notes").read_text().splitlines():
        pid, what, when = line.split()
        by_pid.setdefault(pid, {}).setdefault(what, float(when))
    return sorted(by_pid.values(), key=lambda n: n["start"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fresh", [False, True])
def test_each_case_measures_alone_and_the_next_one_starts_beside_its_shutdown(tmp_path, fresh):
    """No case starts its system before the last one's measurements are over, and none takes
    a measured round before the last one has exited; a case (not a fresh-process run) starts
    while the last one is still shutting down."""
    results = list(pipeline.run_jobs(_probe_jobs(tmp_path, 3, fresh)))
    assert [r.status for r in results] == ["ok"] * 3, [r.message for r in results]
    assert all(r.metrics == {"x": [1.0, 1.0]} for r in results)
    notes = _notes(tmp_path)
    assert len(notes) == (6 if fresh else 3)  # a fresh case: a process per round
    for last, this in zip(notes, notes[1:]):
        assert this["start"] > last["over"]
        assert this["round"] > last["exit"]
        if fresh:  # the whole run is measured: it starts after the last one has gone
            assert this["start"] > last["exit"]
        else:
            assert this["start"] < last["exit"]


@pytest.mark.timeout(120)
def test_a_failing_or_hanging_case_is_reported_and_the_next_one_still_runs(tmp_path):
    """Including a case that measures after saying its measurements are over."""
    failing = _probe_jobs(tmp_path, 1, fail=True)
    late = _probe_jobs(tmp_path, 1, late=True)
    hanging = _probe_jobs(tmp_path, 1, shutdown=30, timeout=5)
    fine = _probe_jobs(tmp_path, 1)
    failed, refused, timed_out, ok = pipeline.run_jobs(failing + late + hanging + fine)
    assert failed.status == "error" and "the probe was told to fail" in failed.message
    assert refused.status == "error" and "after measurements_over()" in refused.message
    assert timed_out.status == "error" and "timed out after 5 s" in timed_out.message
    assert ok.status == "ok" and ok.metrics == {"x": [1.0, 1.0]}


@pytest.mark.timeout(120)
def test_a_fresh_case_that_fails_runs_no_more_processes(tmp_path):
    """A start-up case runs a process per round; once one fails, those not yet started are
    left out (the two started beside it still run), and the next case runs as usual."""
    failing = _probe_jobs(tmp_path, 1, fresh=True, fail=True, repeats=6, shutdown=0)
    fine = _probe_jobs(tmp_path, 1, fresh=True, shutdown=0)
    failed, ok = pipeline.run_jobs(failing + fine)
    assert failed.status == "error" and "the probe was told to fail" in failed.message
    assert ok.status == "ok" and ok.metrics == {"x": [1.0, 1.0]}
    assert len(_notes(tmp_path)) <= 3 + 2  # at most three of the six, then the fine case's


@pytest.mark.timeout(120)
def test_a_case_waiting_behind_a_long_one_keeps_its_whole_time_limit(tmp_path):
    """A case process is spawned early and waits idle while the one before it measures; its
    time limit counts from its start, so 6 s of waiting do not use up a 4 s limit."""
    long = _probe_jobs(tmp_path, 1, work=3.0)
    short = _probe_jobs(tmp_path, 1, timeout=4)
    first, second = pipeline.run_jobs(long + short)
    assert first.status == "ok", first.message
    assert second.status == "ok", second.message
