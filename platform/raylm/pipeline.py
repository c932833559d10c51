"""`raylm pipeline`: corpus -> Ray Data -> Tune sweep of DeepSpeed trials -> Serve -> one completion.

The same config drives every stage; on the tiny config it runs on a 2-core laptop in minutes,
on a bigger one (GPU workers, a real corpus) the same command runs on a cluster.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.console import print_header

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SWEEP = ROOT / "tune_configs" / "tiny_sweep.yaml"


def stage(n: int, name: str) -> float:
    print(f"\n=== [{n}/4] {name} ===", flush=True)
    return time.perf_counter()


def demo_completion(url: str, cfg: RaylmConfig, timeout_s: float = 60.0) -> dict:
    """One real request through the HTTP endpoint, authenticated like any client."""
    from raylm.serve.auth import generated_key, load_api_keys

    s = cfg.serve
    keys = load_api_keys(s)
    headers = {"Content-Type": "application/json"}
    if keys or s.require_api_key:
        headers["Authorization"] = f"Bearer {keys[0] if keys else generated_key()[0]}"
    body = json.dumps({"model": s.model_id, "prompt": "First Citizen:", "max_tokens": 24, "temperature": 0.8,
                       "seed": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"the demo request failed: HTTP {exc.code} {exc.read()[:300]!r}") from None


def run_pipeline(cfg: RaylmConfig, address: Optional[str] = None, keep_serving: bool = False) -> int:
    """Run the four stages in order and print where the endpoint is and how to call it."""
    from raylm.cluster import init_ray
    from raylm.data import prepare_data, resolve_source
    from raylm.serve.app import _deploy, banner, serve_until_interrupted
    from raylm.train.checkpoint import hf_dir
    from raylm.tune import run_sweep, validate_sweep

    validate_sweep(cfg)  # bad config or sweep: exit 2 before Ray starts
    resolve_source(cfg.data)
    storage.check_writable(storage.root(cfg.train.storage_path))  # ... and so does storage it cannot write
    print_header("pipeline", cfg)
    t_start = time.perf_counter()
    init_ray(cfg, address=address)

    t0 = stage(1, f"data: {cfg.data.source}")
    prepared = prepare_data(cfg.data)
    print(f"{prepared.stats.summary()} [{time.perf_counter() - t0:.0f}s]", flush=True)

    t0 = stage(2, f"tune: sweep {cfg.tune.sweep_name} over {', '.join(cfg.tune.search_space)}")
    outcome = run_sweep(cfg, prepared)
    print(f"{outcome.summary()} [{time.perf_counter() - t0:.0f}s]", flush=True)
    if not outcome.best:
        print("error: no trial finished with a checkpoint; see the table above", flush=True)
        return 1

    t0 = stage(3, "serve: the best checkpoint behind the OpenAI-compatible API")
    checkpoint = hf_dir(outcome.best.checkpoint)
    url, keys = _deploy(cfg, checkpoint)
    print(f"deployed {checkpoint} [{time.perf_counter() - t0:.0f}s]", flush=True)

    t0 = stage(4, "one completion through the endpoint")
    reply = demo_completion(url, cfg)
    print(f"prompt: 'First Citizen:' -> {reply['choices'][0]['text']!r}  (usage {reply['usage']}) "
          f"[{time.perf_counter() - t0:.1f}s]", flush=True)

    print(f"\npipeline done in {time.perf_counter() - t_start:.0f}s\n{banner(url, keys, cfg)}", flush=True)
    print(f"best pointer for `raylm serve --checkpoint`: {outcome.best_json}", flush=True)
    if not keep_serving:
        print("(the endpoint stops when this command exits; pass --keep-serving to keep it up)", flush=True)
        return 0
    serve_until_interrupted(cfg)
    return 0
