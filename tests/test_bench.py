"""The benchmark harness itself: a small run end to end, and a missing peer skipped cleanly.

Timings are not asserted (they are measured, never tested); only that the harness runs each
system in its own process and reports medians and ratios."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    res = harness.run_case(workload, case, True, str(tmp_path))
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
        one = harness.run_case(workload, case, False, str(tmp_path), passes=2)
        assert one.status == "ok", one.message
        assert len(one.metrics["rtt_median"]) == 3
        pooled = harness.merge(pooled, one)
    assert len(pooled.metrics["rtt_median"]) == 6 and pooled.status == "ok"
    failed = harness.CaseResult("round_trip", "pipe", "error", message="boom")
    assert harness.merge(pooled, failed).status == "error"
