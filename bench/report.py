"""The benchmark report: machine, versions, the exact command, and one table per stage.

Every stage returns a dict `{"title", "note", "tables": [{"name", "columns", "rows"}], "goals":
[{"goal", "value", "met"}], "raw": {...}}`; `write_report` puts them into
`bench/results/<timestamp>.json` and renders `bench/RESULTS.md` from the same data.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> Optional[float]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - a missing package is reported, not fatal
        return f"not importable ({type(exc).__name__})"


def gpu_info() -> Optional[str]:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except Exception:  # noqa: BLE001
        pass
    return None


def machine_info() -> dict[str, Any]:
    return {
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _ram_gib(),
        "gpu": gpu_info() or "none",
    }


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{m: _version(m) for m in
                                                     ("torch", "ray", "deepspeed", "transformers", "tokenizers")}}


def git_commit() -> str:
    try:
        import subprocess

        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR.parent, capture_output=True,
                             text=True, timeout=10)
        # the report's own outputs (written after every stage) do not make the measured code dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "platform", "bench", ":!bench/results",
                                ":!bench/RESULTS.md"], cwd=BENCH_DIR.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (+ uncommitted changes)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


def command_line(argv: Optional[list[str]] = None) -> str:
    argv = argv if argv is not None else sys.argv
    exe = sys.executable
    try:
        exe = os.path.relpath(exe, BENCH_DIR.parent) if exe.startswith(str(BENCH_DIR.parent)) else exe
    except ValueError:
        pass
    return " ".join(shlex.quote(a) for a in [exe, *argv])


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
    return str(v).replace("|", "\\|")


def md_table(columns: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def render_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [
        "# raylm benchmarks",
        "",
        f"- date: {report['date']}",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, GPU: {m['gpu']} ({m['os']})",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- commit: {report['commit']}",
        f"- command: `{report['command']}`",
        f"- total wall time: {report['seconds']:.0f} s",
        "",
        "Every ratio compares two measurements taken side by side in this one run on this one machine. "
        "Absolute numbers come from a shared 2-core VM (other work may run beside the benchmark): "
        "read the ratios, not the absolutes. Raw numbers: `" + report.get("json_path", "bench/results/*.json") + "`.",
        "",
    ]
    goals = [(name, g) for name, st in report["stages"].items() for g in st.get("goals", [])]
    if goals:
        lines += ["## Goals", "", md_table(["stage", "goal", "measured", "met"],
                                           [[name, g["goal"], g["value"], g["met"]] for name, g in goals]), ""]
    for name, st in report["stages"].items():
        lines += [f"## {st.get('title', name)}", ""]
        if st.get("carried_from"):
            lines += [f"_Not re-measured in this run: from {st['carried_from']}._", ""]
        if st.get("error"):
            lines += [f"**failed:** `{st['error']}`", ""]
        if st.get("skipped"):
            lines += [f"skipped: {st['skipped']}", ""]
        if st.get("note"):
            lines += [st["note"], ""]
        for table in st.get("tables", []):
            if table.get("name"):
                lines += [f"**{table['name']}**", ""]
            lines += [md_table(table["columns"], table["rows"]), ""]
            if table.get("note"):
                lines += [table["note"], ""]
        if st.get("findings"):
            lines += ["Findings:", ""] + [f"- {f}" for f in st["findings"]] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(stages: dict[str, dict], started: float, argv: Optional[list[str]] = None,
                 md_path: Path = RESULTS_MD) -> tuple[Path, Path]:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(started))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS_DIR / f"{stamp}.json"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
        "machine": machine_info(),
        "versions": versions(),
        "commit": git_commit(),
        "command": command_line(argv),
        "seconds": time.time() - started,
        "json_path": os.path.relpath(json_path, BENCH_DIR.parent),
        "stages": stages,
    }
    json_path.write_text(json.dumps(report, indent=2, default=str))
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)
