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

from raylm import console, storage
from raylm.config import RaylmConfig
from raylm.console import Progress, print_header, say

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SWEEP = ROOT / "tune_configs" / "tiny_sweep.yaml"


def stage(n: int, name: str) -> None:
    say(f"\n=== [{n}/4] {name} ===", event="stage", n=n, name=name)


def demo_prompt(cfg: RaylmConfig, words: int = 3) -> str:
    """The first words of the corpus (its first non-empty text line): a prompt the model has seen."""
    from raylm.data import embedded_documents, resolve_source

    src = resolve_source(cfg.data)
    text = ""
    if src.kind == "embedded":
        text = embedded_documents()[0]
    elif src.kind == "text" and src.paths:
        with open(src.paths[0], errors="replace") as f:
            text = f.read(4096)
    elif src.kind == "jsonl" and src.paths:
        with open(src.paths[0], errors="replace") as f:
            text = str(json.loads(f.readline() or "{}").get(cfg.data.text_field, ""))
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return " ".join(line.split()[:words]) or "The"


def prepare_data_with_progress(cfg: RaylmConfig):
    """The data stage (Ray Data: read, tokenize, pack), shown as one progress line, then whether
    the packed-token cache was built or reused (and what reusing it saved)."""
    from raylm.data import prepare_data

    bar = Progress(f"data: {cfg.data.source}")
    console.silence()  # Ray Data sets its loggers' levels when it is imported
    prepared = prepare_data(cfg.data, verbose=not console.quiet(), storage_path=cfg.train.storage_path)
    bar.close(prepared.stats.summary(), show_elapsed=False)
    say(prepared.reuse_line(), event="data_cache", uri=prepared.uri, built=prepared.built, build_s=prepared.build_s,
        seconds=prepared.stats.seconds)
    return prepared


def demo_completion(url: str, cfg: RaylmConfig, prompt: str, timeout_s: float = 60.0) -> dict:
    """One real request through the HTTP endpoint, authenticated like any client."""
    from raylm.serve.auth import generated_key, load_api_keys

    s = cfg.serve
    keys = load_api_keys(s)
    headers = {"Content-Type": "application/json"}
    if keys or s.require_api_key:
        headers["Authorization"] = f"Bearer {keys[0] if keys else generated_key()[0]}"
    body = json.dumps({"model": s.model_id, "prompt": prompt, "max_tokens": 24, "temperature": 0.8,
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
    from raylm.data import resolve_source
    from raylm.lifecycle import eval_gate, history, rollout
    from raylm.serve.app import _base_url, banner, serve_until_interrupted
    from raylm.lifecycle.rollout import deploy_recorded
    from raylm.serve.auth import setup_keys
    from raylm.train.checkpoint import hf_dir
    from raylm.tune import run_sweep, validate_sweep

    validate_sweep(cfg)  # bad config or sweep: exit 2 before Ray starts
    resolve_source(cfg.data)
    storage.check_writable(storage.root(cfg.train.storage_path))  # ... and so does storage it cannot write
    print_header("pipeline", cfg)
    t_start = time.perf_counter()
    init_ray(cfg, address=address)

    stage(1, f"data: {cfg.data.source}")
    prepared = prepare_data_with_progress(cfg)

    stage(2, f"tune: sweep {cfg.tune.sweep_name} over {', '.join(cfg.tune.search_space)}")
    outcome = run_sweep(cfg, prepared)
    say(outcome.summary(), event="swept", sweep_dir=outcome.sweep_dir, best_json=outcome.best_json)
    if not outcome.best:
        say("error: no trial finished with a checkpoint; see the table above", event="error")
        return 1
    if cfg.tune.evaluate_best or cfg.tune.evaluate_trials:
        from raylm.evaluate import evaluate_sweep_best

        evaluate_sweep_best(cfg, outcome)

    checkpoint = hf_dir(outcome.best.checkpoint)
    if rollout.is_serving(cfg) and history.live_entry(history.read_history(cfg)):
        stage(3, f"promote: the best checkpoint against the model {cfg.serve.app_name} serves (serve.promote)")
        try:
            entry = rollout.promote(cfg, checkpoint)
            say(f"{entry['version']} is live: {checkpoint}", event="promoted", entry=entry)
        except eval_gate.PromotionRefused as exc:
            say(str(exc), event="refused")
        url, keys = _base_url(cfg.serve), setup_keys(cfg.serve)
    else:
        stage(3, "serve: the best checkpoint behind the OpenAI-compatible API")
        bar = Progress("serve: vLLM replica warm-up")
        url, keys = deploy_recorded(cfg, checkpoint)
        bar.close(f"{checkpoint} at {url}/v1")

    stage(4, "one completion through the endpoint")
    prompt = demo_prompt(cfg)
    t0 = time.perf_counter()
    reply = demo_completion(url, cfg, prompt)
    say(f"prompt: {prompt!r} -> {reply['choices'][0]['text']!r}  (usage {reply['usage']}) "
        f"[{time.perf_counter() - t0:.1f}s]", event="completion", prompt=prompt, reply=reply)

    say(f"\npipeline done in {time.perf_counter() - t_start:.0f}s\n{banner(url, keys, cfg)}", event="done",
        url=f"{url}/v1", seconds=round(time.perf_counter() - t_start, 1))
    say(f"best pointer for `raylm serve --checkpoint`: {outcome.best_json}")
    if not keep_serving:
        say("(the endpoint stops when this command exits; pass --keep-serving to keep it up)")
        return 0
    serve_until_interrupted(cfg)
    return 0
