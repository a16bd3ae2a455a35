"""The results table: plain text for the terminal, markdown for docs/performance.md."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess

import psutil

from bench.harness import ROOT, CaseResult, Metric, Workload, summarize

PACKAGES = ["ray", "dask", "distributed", "loky", "joblib", "numpy", "pandas", "scikit-learn",
            "cloudpickle", "grpcio", "psutil"]


def fmt(v: float) -> str:
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.3f}x"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(),
            "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "rayx"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        out["rayx"] = f"git {commit}" + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["rayx"] = "unknown"
    return out


def _by_system(results: list[CaseResult], workload: str) -> dict[str, CaseResult]:
    return {r.system: r for r in results if r.workload == workload}


def _metric_rows(w: Workload, m: Metric, by: dict[str, CaseResult],
                 params: dict) -> list[list[str]]:
    """[metric, system, median, spread, n, rayx / system] for each system of one metric."""
    arrow = "higher is better" if m.higher_is_better else "lower is better"
    head = f"{m.label.format(**params)} [{m.unit}, {arrow}]"
    rx = by.get("rayx")
    rx_stats = summarize(rx.metrics.get(m.key, [])) if rx and rx.status == "ok" else None
    rows = []
    for case in w.cases:
        res = by.get(case.system)
        if res is None:
            continue
        if res.status != "ok":
            if m is w.metrics[0]:
                why = res.message.splitlines()[0] if res.message else ""
                rows.append([head, case.system, res.status, why[:70], "", ""])
                head = ""
            continue
        st = summarize(res.metrics.get(m.key, []))
        if st is None:
            continue
        ratio = ""
        if rx_stats and case.system != "rayx" and st["median"]:
            ratio = fmt_ratio(rx_stats["median"] / st["median"])
        spread = f"{fmt(st['lo'])} - {fmt(st['hi'])} ({st['kind']})"
        rows.append([head, case.system, fmt(st["median"]), spread, str(st["n"]), ratio])
        head = ""
    return rows


def _stats(res: CaseResult | None, key: str) -> dict | None:
    return summarize(res.metrics.get(key, [])) if res and res.status == "ok" else None


def _verdict(t, m: Metric, rx: dict | None, peer: dict | None) -> tuple[str, str]:
    if rx is None or (t.peer and peer is None):
        return "", "not measured"
    got = t.check(rx["median"], peer["median"] if peer else None)
    if got is None:
        return "", "not measured"
    x, ok = got
    value = fmt_ratio(x) if t.peer else f"{fmt(x)} {m.unit}"
    verdict = "met" if ok else "MISSED"
    if peer and rx["lo"] <= peer["hi"] and peer["lo"] <= rx["hi"]:
        verdict += " (spreads overlap)"
    return value, verdict


def target_rows(workloads: list[Workload], results: list[CaseResult],
                quick: bool) -> list[list[str]]:
    """[metric, target, rayx / peer (or rayx's value), verdict] for every stated target."""
    out = []
    for w in workloads:
        by = _by_system(results, w.name)
        for m in w.metrics:
            for t in m.targets:
                rx = _stats(by.get("rayx"), m.key)
                peer = _stats(by.get(t.peer), m.key) if t.peer else None
                value, verdict = _verdict(t, m, rx, peer)
                label = f"{w.name}: {m.label.format(**w.params(quick))}"
                out.append([label, t.text, value, verdict])
    return out


def _table(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(wd) for h, wd in zip(header, widths)).rstrip()
    lines = [line, "-" * len(line)]
    lines += ["  ".join(str(c).ljust(wd) for c, wd in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


HEADER = ["metric", "system", "median", "spread", "n", "rayx / system"]


def render(workloads: list[Workload], results: list[CaseResult], command: str,
           quick: bool, markdown: bool = False, vers: dict | None = None,
           reused: str = "") -> str:
    parts = []
    mach = machine()
    vers = vers or versions()
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if markdown:
        parts.append(f"Run {when} with `{command}`.\n")
        parts.append(f"Machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']} RAM, "
                     f"{mach['os']}, Python {mach['python']}.\n")
        parts.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".\n")
        if reused:
            parts.append(reused + "\n")
    else:
        parts.append(f"rayx benchmarks  {when}  command: {command}")
        parts.append(f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory']}, "
                     f"{mach['os']}, Python {mach['python']}")
        parts.append("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
        if reused:
            parts.append(reused)
        parts.append("")
    for w in workloads:
        by = _by_system(results, w.name)
        rows = []
        params = w.params(quick)
        for m in w.metrics:
            rows += _metric_rows(w, m, by, params)
        title = f"{w.name}: {w.title.format(**params)}"
        parts.append(f"### {title}\n" if markdown else title)
        parts.append(_table(HEADER, rows, markdown))
        infos = [f"{r.system} {', '.join(f'{k} {v}' for k, v in r.info.items())}"
                 for r in results if r.workload == w.name and r.info]
        if infos:
            parts.append(("\n" if markdown else "") + "Info: " + "; ".join(infos) + ".")
        if w.notes:
            parts.append(("\n" if markdown else "") + f"Note: {w.notes}")
        parts.append("")
    targets = target_rows(workloads, results, quick)
    if targets:
        parts.append("### Targets\n" if markdown else "targets")
        parts.append(_table(["metric", "target", "rayx / peer", "verdict"], targets, markdown))
        parts.append("")
    leaks = [(r, leak) for r in results for leak in r.leaks]
    if leaks:
        parts.append("Process or shared-memory leaks (killed/removed after the run):")
        parts += [f"- {r.workload}/{r.system}: {leak}" for r, leak in leaks]
    else:
        parts.append("No process or shared-memory leaks: every system left nothing behind.")
    return "\n".join(parts) + "\n"
