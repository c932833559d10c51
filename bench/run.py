"""Run the raylm benchmark suite and write bench/results/<timestamp>.json and bench/RESULTS.md.

    .venv/bin/python bench/run.py                       # every stage (about 20-25 min on 2 cores; + 30-40 for qwen05)
    .venv/bin/python bench/run.py --quick               # smaller sizes (under 10 min; + ~15 min for batching)
    .venv/bin/python bench/run.py --only data,serve     # some stages
    .venv/bin/python bench/run.py --only qwen05         # the Qwen2-0.5B shape (section 18): 30-40 min on its own

Each stage runs in its own Python process with its own local Ray cluster (token auth on, as
raylm always starts it), so one stage's actors, env flags and memory never leak into the next.
A stage that fails is recorded as failed in the report; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from report import RESULTS_MD, write_report  # noqa: E402

STAGES = {  # name -> (module file, stage timeout in seconds: quick, full)
    "data": ("data_bench.py", 400, 600),
    "train": ("train_bench.py", 900, 1200),
    "serve": ("serve_bench.py", 600, 900),
    "tune": ("tune_bench.py", 600, 900),
    "gpu": ("gpu_bench.py", 1200, 2400),
    "sft": ("sft_bench.py", 600, 1200),
    "ckpt": ("ckpt_bench.py", 600, 1200),
    "dpo": ("dpo_bench.py", 900, 1500),
    "zero3": ("zero3_mem_bench.py", 900, 1500),
    "batching": ("batching_bench.py", 1200, 1800),
    "edge": ("edge_bench.py", 900, 1200),
    "prefix": ("prefix_bench.py", 900, 1200),
    "qwen05": ("qwen05_bench.py", 900, 3000),  # Qwen2-0.5B shape, LoRA + full vs bare DeepSpeed: ~30-40 min full
}


def run_stage(name: str, quick: bool, workdir: str) -> dict:
    module, quick_limit, full_limit = STAGES[name]
    out = os.path.join(workdir, f"{name}.json")
    cmd = [sys.executable, str(BENCH_DIR / module), "--out", out, "--workdir", os.path.join(workdir, name)]
    if quick:
        cmd.append("--quick")
    limit = quick_limit if quick else full_limit
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=BENCH_DIR.parent, timeout=limit)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.time() - t0
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    else:
        result = {"title": name, "error": f"stage exited with {rc} after {seconds:.0f}s and wrote no result"}
    result["seconds"] = seconds
    print(f"== {name}: done in {seconds:.0f}s (rc {rc})", flush=True)
    return result


def earlier_stages(skip: list[str]) -> dict[str, dict]:
    """Stages this run does not measure, from the newest earlier report that has each, marked with
    where they come from: a partial run (`--only`) keeps the other sections of RESULTS.md."""
    out: dict[str, dict] = {}
    for path in sorted((BENCH_DIR / "results").glob("*.json"), reverse=True):
        report = json.loads(path.read_text())
        for name, stage in report.get("stages", {}).items():
            if name not in skip and name not in out and not stage.get("error"):
                out[name] = {**stage, "carried_from": f"{path.relative_to(BENCH_DIR.parent)} "
                                                      f"(commit {report.get('commit')}, {report.get('date')})"}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(STAGES), help=f"comma-separated stages ({','.join(STAGES)})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: the whole suite in under 10 minutes")
    parser.add_argument("--md", default=str(RESULTS_MD), help="where to write the markdown table")
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        parser.error(f"--only: unknown stage(s) {unknown}; choose from {list(STAGES)}")
    started = time.time()
    measured: dict[str, dict] = {}
    earlier = earlier_stages(skip=names)
    with tempfile.TemporaryDirectory(prefix="raylm-bench-") as workdir:
        for name in names:
            measured[name] = run_stage(name, args.quick, workdir)
            stages = {n: measured.get(n) or earlier[n] for n in STAGES if n in measured or n in earlier}
            json_path, md_path = write_report(stages, started, md_path=Path(args.md))  # partial results survive
    print(f"wrote {json_path} and {md_path}", flush=True)
    return 0 if not any(s.get("error") for s in measured.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
