"""`python -m bench [--quick] [--only NAME ...] [--systems rayx,ray] [--markdown FILE]`.

Runs every workload (or the chosen ones) on every installed system, each case in a fresh
process that measures alone (bench/pipeline.py), and prints the table. See
docs/performance.md for the latest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time

from bench import harness, pipeline, report


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes, fewer rounds, one pass (about three minutes on 2 "
                         "cores with every peer, under two without Ray: it starts afresh "
                         "for each workload)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this workload (name or prefix; repeatable or a,b)")
    ap.add_argument("--systems", default="", metavar="A,B",
                    help="run only these systems (e.g. rayx,ray)")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as markdown")
    ap.add_argument("--json", metavar="FILE", help="also write every raw sample as JSON")
    ap.add_argument("--reuse", metavar="FILE",
                    help="take the cases this run leaves out (by --only/--systems) from an "
                         "earlier --json FILE, e.g. to re-run rayx alone after a change")
    ap.add_argument("--from-json", metavar="FILE",
                    help="run nothing: print (and --markdown) the table of an earlier --json FILE")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="SECONDS",
                    help="before each case, wait up to this long for the CPUs to be idle "
                         "(for shared machines; each case then starts after the last one "
                         "has exited, not beside its shutdown)")
    ap.add_argument("--list", action="store_true", help="list workloads and systems, then exit")
    return ap.parse_args(argv)


def wait_quiet(limit: float, busy_percent: float = 15.0) -> None:
    """Wait until the machine's CPUs are idle for a second (at most `limit` s)."""
    import psutil

    t0 = time.monotonic()
    while psutil.cpu_percent(interval=1.0) > busy_percent and time.monotonic() - t0 < limit:
        pass
    if time.monotonic() - t0 > 2:
        print(f"(waited {time.monotonic() - t0:.0f} s for idle CPUs)", file=sys.stderr)


def reuse(path: str, workloads: list, chosen: list, results: list) -> tuple:
    """Add the earlier run's results for every (workload, system) this run did not measure."""
    with open(path) as f:
        old = json.load(f)
    done = {(r.workload, r.system) for r in results}
    names = {w.name for w in chosen}
    merged = list(results)
    for r in old["results"]:
        if (r["workload"], r["system"]) not in done and r["workload"] in names:
            merged.append(harness.CaseResult(**r))
    systems = sorted({r.system for r in merged if (r.workload, r.system) not in done})
    note = (f"Rows of {', '.join(systems)} are reused from {old['command']!r} "
            f"(rayx there: {old['versions'].get('rayx', '?')}).") if systems else ""
    shown = [w for w in workloads if w.name in names]  # with every system's case again
    return shown, merged, note


def show_saved(path: str, chosen: list, args: argparse.Namespace) -> int:
    with open(path) as f:
        saved = json.load(f)
    results = [harness.CaseResult(**r) for r in saved["results"]]
    quick = "--quick" in saved["command"].split()
    kw = {"vers": saved["versions"], "reused": saved.get("reused", "")}
    print(report.render(chosen, results, saved["command"], quick, **kw))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.render(chosen, results, saved["command"], quick, markdown=True, **kw))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    workloads = harness.all_workloads()
    if args.list:
        for w in workloads:
            systems = ", ".join(c.system for c in w.cases)
            print(f"{w.name:15} {systems:40} {w.title.format(**w.params(args.quick))}")
        return 0
    only = [name for item in args.only for name in item.split(",") if name]
    systems = [s for s in args.systems.split(",") if s]
    chosen = harness.select(workloads, only, systems)
    if not chosen:
        print(f"no workload matches --only {only} --systems {systems}; see --list",
              file=sys.stderr)
        return 2
    if args.from_json:
        return show_saved(args.from_json, chosen, args)
    command = " ".join(["python -m bench", *map(shlex.quote, argv)])
    vers = report.versions()  # now: the code that runs, not what is there when it ends
    log_dir = tempfile.mkdtemp(prefix="rayx-bench-logs-")
    total = sum(len(w.cases) * w.passes_for(args.quick) for w in chosen)
    print(f"{total} cases; logs in {log_dir}; load average {os.getloadavg()[0]:.2f}",
          file=sys.stderr)
    jobs = [pipeline.Job(w, case, args.quick, log_dir, w.passes_for(args.quick), n)
            for w in chosen for n in range(1, w.passes_for(args.quick) + 1) for case in w.cases]
    before = (lambda: wait_quiet(args.wait_quiet)) if args.wait_quiet else None
    pooled: dict[tuple[str, str], harness.CaseResult] = {}
    t0 = time.perf_counter()
    # with --wait-quiet each case starts when the last one has exited and the CPUs are idle;
    # otherwise it starts beside the last one's shutdown (its measured rounds wait for its end)
    results = pipeline.run_jobs(jobs, overlap=not args.wait_quiet, before_start=before)
    for i, (job, res) in enumerate(zip(jobs, results, strict=True), 1):
        which = f" pass {job.pass_no}/{job.passes}" if job.passes > 1 else ""
        msg = res.status if res.status == "ok" else f"{res.status}: {res.message[:200]}"
        leak = f", {len(res.leaks)} leak(s)" if res.leaks else ""
        print(f"[{i}/{len(jobs)}] {job.workload.name} / {job.case.system}{which}: {msg} "
              f"({res.wall:.1f} s in its process{leak}; {time.perf_counter() - t0:.0f} s "
              "into the run)", file=sys.stderr, flush=True)
        key = (job.workload.name, job.case.system)
        pooled[key] = harness.merge(pooled.get(key), res)
    results = list(pooled.values())
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    shown, reused = chosen, ""
    if args.reuse:
        shown, results, reused = reuse(args.reuse, workloads, chosen, results)
    print(report.render(shown, results, command, args.quick, vers=vers, reused=reused))
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.render(shown, results, command, args.quick, markdown=True,
                                  vers=vers, reused=reused))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "machine": report.machine(), "versions": vers,
                       "reused": reused,
                       "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
