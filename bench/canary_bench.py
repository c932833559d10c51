"""A canary under load, and a gated promote from a second shell under load (issue 34): what
clients see in each phase. One run, phase after phase, with closed-loop clients (half streaming,
16 tokens each, every request its own conversation so the canary's split applies):

1. steady state on v1;
2. `raylm promote --canary 25` (in process, forced): the candidate's deployment starts beside v1;
3. the canary running: the candidate's share of requests;
4. `raylm promote --finish`: the candidate rolls into the model deployment, the canary goes;
5. steady state on v2;
6. `raylm promote` (gated: both evaluated on the same eval set) of a third checkpoint, run as a
   user's second shell runs it: a subprocess with only PATH and HOME, joining the cluster;
7. steady state on v3.

    python bench/canary_bench.py --out /tmp/canary.json [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from common import stage_main, start_ray  # noqa: E402
from rollout_bench import KEY, MODEL_ID, PORT, Clients  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run(args) -> dict:
    from raylm.config import dump_config, load_config
    from raylm.lifecycle import canary, rollout
    from raylm.serve.tiny import make_tiny_checkpoint

    work = Path(args.workdir)
    (work / "keys").write_text(KEY + "\n")
    a, b, c = (make_tiny_checkpoint(str(work / name), seed=seed) for seed, name in enumerate("abc"))
    steady_s = 10 if args.quick else 30
    clients = 4 if args.quick else 8
    cfg = load_config(None, [
        f"serve.port={PORT}", f"serve.model_id={MODEL_ID}", f"serve.api_key_file={work / 'keys'}",
        "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", f"train.storage_path={work / 'storage'}",
        "serve.kv_cache_memory_gib=0.25", "serve.graceful_shutdown_timeout_s=30",
        # the gate's eval set: the embedded corpus in the checkpoints' tokenizer; random tiny models
        # score alike, so a tolerance lets the third one through (the gate still evaluates both)
        f"data.tokenizer={a}", "data.max_documents=200", "data.seq_len=64", "eval.max_val_rows=16",
        "eval.dtype=float32", "serve.promote.tolerance=1.0"])
    config_file = work / "serve.yaml"
    config_file.write_text(dump_config(cfg))
    start_ray(num_cpus=4)
    url, _ = rollout.deploy_recorded(cfg, a)
    marks: dict[str, float] = {}
    second_shell: dict = {}
    with Clients(url, clients, varied=True) as load:
        time.sleep(steady_s)
        marks["canary_start"] = time.monotonic()
        canary.start(cfg, b, 25.0, force=True)
        marks["canary_running"] = time.monotonic()
        time.sleep(steady_s)
        marks["finish"] = time.monotonic()
        canary.finish(cfg)
        marks["steady_v2"] = time.monotonic()
        time.sleep(steady_s)
        marks["gated_promote"] = time.monotonic()
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": os.environ["HOME"]}
        out = subprocess.run([sys.executable, "-m", "raylm", "promote", "-c", str(config_file), c, "--json"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
        second_shell = {"exit": out.returncode, "events": [json.loads(line).get("event") for line in
                                                             out.stdout.splitlines() if line.startswith("{")],
                        "stderr_tail": out.stderr[-600:]}
        marks["steady_v3"] = time.monotonic()
        time.sleep(steady_s)
        marks["end"] = time.monotonic()
    from ray import serve

    serve.shutdown()
    marks = {"steady_v1": marks["canary_start"] - steady_s, **marks}
    names = list(marks)  # each phase runs from its mark to the next one
    phases = {name: {**load.window(marks[name], marks[after]), "duration_s": round(marks[after] - marks[name], 1)}
              for name, after in zip(names, names[1:])}
    running = [r for r in load.records if marks["canary_running"] <= r[0] < marks["finish"]]
    share = sum(r[3] == "v2" for r in running) / max(1, len(running))
    return {"clients": clients, "canary_percent": 25.0, "canary_share_measured": round(100 * share, 1),
            "phases": phases, "second_shell_promote": second_shell,
            "failed_total": sum(not r[2] for r in load.records), "requests_total": len(load.records),
            "cpus": os.cpu_count()}


if __name__ == "__main__":
    stage_main(run)
