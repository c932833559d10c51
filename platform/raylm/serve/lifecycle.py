"""New models into a live endpoint: the promotion history, the eval gate, rollouts and rollback.

A rollout redeploys the Serve app in place over another checkpoint. Serve's rolling update with
surge (serve/options.py) starts the new replicas and waits for their health check while the old
ones keep serving, then drains the old ones; responses name their version
(`x-raylm-model-version`). A rollout that fails (the engine cannot load the checkpoint) is undone
by deploying the previous inputs again: their replicas never stopped, and the pinned code version
(serve/app.py `build_app`) leaves them untouched.

The history lives in storage, beside the runs: `<storage>/serve/<app_name>/promotions.json`, a
list of entries (newest last) written whole, so no reader sees half of it. The live model is the
newest entry that deployed one (`deploy`, `promote`, `rollback`); `adapter` entries record
adapters put under serve.adapters_path.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from typing import Any, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import CheckpointError, InputError, ServeDeployError
from raylm.serve.auth import KeySetup

HISTORY_FILE = "promotions.json"
MODEL_ACTIONS = ("deploy", "promote", "rollback")
LOWER_IS_BETTER = {"val_loss": True, "perplexity": True, "exact_match": False, "contains": False}
EXIT_REFUSED = 3  # `raylm promote`: the candidate did not pass the gate (2 stays "bad input")


class PromotionRefused(Exception):
    """The candidate scored worse than the served model beyond serve.promote.tolerance."""


# ------------------------------------------------------------------ history


def history_uri(cfg: RaylmConfig) -> str:
    return storage.join(storage.root(cfg.train.storage_path), "serve", cfg.serve.app_name, HISTORY_FILE)


def read_history(cfg: RaylmConfig) -> list[dict]:
    uri = history_uri(cfg)
    if storage.kind(uri) != "file":
        return []
    history = storage.read_json(uri)
    if not isinstance(history, list):
        raise InputError(f"{uri}: not a promotion history (a JSON list)")
    return history


def record(cfg: RaylmConfig, **entry: Any) -> dict:
    """Append one entry (with its time) to the history and return it."""
    history = read_history(cfg)
    entry = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
    storage.write_json(history_uri(cfg), [*history, entry])
    return entry


def live_entry(history: list[dict]) -> Optional[dict]:
    """The entry of the model the endpoint serves: the newest one that deployed a model."""
    return next((e for e in reversed(history) if e.get("action") in MODEL_ACTIONS), None)


def next_version(history: list[dict]) -> str:
    """v1, v2, ...: one per deploy or promotion (a rollback reuses the version it returns to)."""
    return f"v{1 + sum(e.get('action') in ('deploy', 'promote') for e in history)}"


# ------------------------------------------------------------------ the gate


def gate(metric: str, tolerance: float, candidate: dict, served: dict) -> tuple[bool, str]:
    """Whether the candidate's eval is at least as good as the served model's by `metric`, within
    `tolerance` (in the metric's units), and a line giving both numbers."""
    ours, theirs = candidate.get(metric), served.get(metric)
    for name, result in (("candidate", ours), ("served model", theirs)):
        if not isinstance(result, (int, float)):
            raise InputError(f"serve.promote.metric={metric}: the {name}'s eval has no {metric} "
                             f"(it has {', '.join(sorted(k for k, v in (candidate if name == 'candidate' else served).items() if isinstance(v, (int, float))))})")
    lower = LOWER_IS_BETTER[metric]
    passed = ours <= theirs + tolerance if lower else ours >= theirs - tolerance
    line = (f"{metric}: candidate {ours:.4f} vs served {theirs:.4f} ({'lower' if lower else 'higher'} is better, "
            f"serve.promote.tolerance={tolerance:g})")
    return passed, line


def same_eval_set(a: dict, b: dict) -> None:
    if a.get("eval_set") != b.get("eval_set"):
        raise InputError(f"the evals of {a.get('checkpoint')} and {b.get('checkpoint')} are not on the same eval set "
                         f"({a.get('eval_set')} vs {b.get('eval_set')}): compare them with one config")


# ------------------------------------------------------------------ rollouts


def is_serving(cfg: RaylmConfig) -> bool:
    """Whether the app runs on the Ray cluster this process is connected to."""
    from ray import serve

    try:
        app = serve.status().applications.get(cfg.serve.app_name)
    except Exception:  # noqa: BLE001 - no Serve on this cluster
        return False
    return app is not None and app.status in ("RUNNING", "DEPLOYING", "UNHEALTHY")


def rollout(cfg: RaylmConfig, checkpoint: str, version: str, previous: Optional[dict]) -> None:
    """Put `checkpoint` into the live app as `version`, in place; on failure deploy `previous`
    again (which never stopped serving) and raise `ServeDeployError` naming the checkpoint."""
    from raylm.serve.app import _deploy

    try:
        _deploy(cfg, checkpoint, version)
    except Exception as exc:  # noqa: BLE001 - any failure: the old model must keep serving
        kept = ""
        if previous is not None:
            try:
                _deploy(cfg, previous["checkpoint"], previous["version"])
                kept = f"; {previous['version']} ({previous['checkpoint']}) keeps serving"
            except Exception as again:  # noqa: BLE001
                kept = f"; restoring {previous['version']} failed too: {again}"
        raise ServeDeployError(f"rollout of {checkpoint} failed: {_first_line(exc)}{kept}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


# ------------------------------------------------------------------ the verbs


def deploy_recorded(cfg: RaylmConfig, checkpoint: str) -> tuple[str, KeySetup]:
    """Deploy as the next model version and record it in the promotion history (which `raylm
    promote` and `rollback` start from)."""
    from raylm.serve.app import _deploy

    history = read_history(cfg)
    live = live_entry(history)
    version = next_version(history)
    url, keys = _deploy(cfg, checkpoint, version)
    record(cfg, action="deploy", version=version, checkpoint=checkpoint,
           from_version=live["version"] if live else None, from_checkpoint=live["checkpoint"] if live else None)
    return url, keys


def run_serve(cfg: RaylmConfig, checkpoint: str, blocking: bool) -> int:
    """`raylm serve`: deploy, print the URL/key location/examples; block until Ctrl-C if asked."""
    from raylm.serve.app import banner, direct_urls, serve_until_interrupted

    url, keys = deploy_recorded(cfg, checkpoint)
    direct = tuple(direct_urls(cfg.serve)) if cfg.serve.ingress_mode == "direct" else ()
    say(banner(url, keys, cfg, direct), event="serving", url=f"{url}/v1", direct=[f"{u}/v1" for u in direct])
    if blocking:
        serve_until_interrupted(cfg)
    return 0


def _live(cfg: RaylmConfig) -> tuple[list[dict], dict]:
    history = read_history(cfg)
    live = live_entry(history)
    if live is None:
        raise InputError(f"no model has been served from {history_uri(cfg)}: start the endpoint with `raylm serve` "
                         "(same config) first")
    return history, live


def _check_serving(cfg: RaylmConfig) -> None:
    if not is_serving(cfg):
        raise InputError(f"serve app {cfg.serve.app_name!r} is not running on this Ray cluster: start it with "
                         "`raylm serve`, or join its cluster (--address, cluster.address or RAY_ADDRESS)")


def evaluate(cfg: RaylmConfig, checkpoint: str) -> dict:
    """`raylm eval`'s result for the checkpoint on the config's eval set, reusing its eval.json when
    it already holds that (the served model was evaluated when it was promoted)."""
    from raylm.evaluate import evaluate_checkpoint, summary

    result = evaluate_checkpoint(cfg, checkpoint, reuse=True)
    say(f"eval of {checkpoint}{' (eval.json reused)' if result.get('reused') else ''}: {summary(result)}",
        event="evaluated", checkpoint=checkpoint, result=result)
    return result


def evaluate_both(cfg: RaylmConfig, candidate: str, served: str) -> tuple[dict, dict]:
    """The gate's two evaluations, at the same time: each starts its own vLLM engine (on 2 CPU
    cores, ~25 s of start-up that is mostly one process importing), and the served model's result
    is usually reused from its eval.json anyway. The eval set is prepared once first, so the two do
    not build the same cache together. Where the cluster has room for one engine only (one GPU),
    Ray Data runs the second after the first."""
    from concurrent.futures import ThreadPoolExecutor

    from raylm.data import prepare_data

    prepare_data(cfg.data, verbose=False, storage_path=cfg.train.storage_path)
    with ThreadPoolExecutor(2, thread_name_prefix="raylm-eval") as pool:
        ours, theirs = pool.submit(evaluate, cfg, candidate), pool.submit(evaluate, cfg, served)
        return ours.result(), theirs.result()


def promote(cfg: RaylmConfig, candidate: str, force: bool = False) -> dict:
    """`raylm promote`: evaluate the candidate and the served model on the same eval set, roll the
    candidate out if it passes the gate (or `force`), and record it. Ray must be initialised."""
    history, live = _live(cfg)
    _check_serving(cfg)
    metrics: dict[str, Any] = {}
    if not force:
        ours, theirs = evaluate_both(cfg, candidate, live["checkpoint"])
        same_eval_set(ours, theirs)
        passed, line = gate(cfg.serve.promote.metric, cfg.serve.promote.tolerance, ours, theirs)
        metrics = {"metric": cfg.serve.promote.metric, "candidate": ours.get(cfg.serve.promote.metric),
                   "served": theirs.get(cfg.serve.promote.metric)}
        if not passed:
            raise PromotionRefused(f"not promoted: {line}; {live['version']} keeps serving (--force overrides)")
        say(f"gate passed: {line}", event="gate", **metrics)
    version = next_version(history)
    say(f"rolling {candidate} out as {version} (replacing {live['version']}; old replicas drain for up to "
        f"{cfg.serve.graceful_shutdown_timeout_s:g} s)", event="rollout", version=version)
    rollout(cfg, candidate, version, live)
    return record(cfg, action="promote", version=version, checkpoint=candidate, from_version=live["version"],
                  from_checkpoint=live["checkpoint"], metrics=metrics, forced=force)


def rollback(cfg: RaylmConfig) -> dict:
    """`raylm rollback`: roll the model served before the live one back out (no gate)."""
    history, live = _live(cfg)
    if not live.get("from_checkpoint"):
        raise InputError(f"{live['version']} ({live['checkpoint']}) is the first model served here: nothing to roll "
                         f"back to ({history_uri(cfg)})")
    _check_serving(cfg)
    back = {"version": live["from_version"], "checkpoint": live["from_checkpoint"]}
    earlier = next((e for e in reversed(history) if e.get("action") in MODEL_ACTIONS
                    and e.get("version") == back["version"]), {})
    say(f"rolling {back['version']} ({back['checkpoint']}) back out, replacing {live['version']}", event="rollout",
        version=back["version"])
    rollout(cfg, back["checkpoint"], back["version"], live)
    return record(cfg, action="rollback", version=back["version"], checkpoint=back["checkpoint"],
                  from_version=live["version"], from_checkpoint=live["checkpoint"],
                  **({"from_entry": earlier.get("at")} if earlier else {}))


def add_adapter(cfg: RaylmConfig, name: str, adapter_dir: str) -> dict:
    """`raylm promote --adapter NAME DIR`: check the peft adapter against the served model and put
    it under serve.adapters_path/NAME, where every replica finds it at its next request for
    `<model_id>:NAME` (no redeploy, no Ray needed here)."""
    from raylm.serve.app import adapter_base_mismatch

    s = cfg.serve
    if not s.adapters_path:
        raise InputError("serve.adapters_path is not set: adapters join a live endpoint from there")
    if not name or "/" in name or ":" in name or name.startswith("."):
        raise InputError(f"--adapter {name!r}: a folder name without '/', ':' or a leading '.'")
    _, live = _live(cfg)
    source = adapter_dir if storage.is_remote(adapter_dir) else os.path.abspath(os.path.expanduser(adapter_dir))
    if storage.kind(source) != "dir":
        raise CheckpointError(f"adapter not found: {source}")
    served = storage.read_json(storage.join(live["checkpoint"], "config.json"))
    why = adapter_base_mismatch(source, served, s.max_lora_rank)
    if why:
        raise CheckpointError(f"adapter {source} cannot be served on {live['version']} ({live['checkpoint']}): {why}")
    target = storage.join(s.adapters_path if storage.is_remote(s.adapters_path)
                          else os.path.abspath(os.path.expanduser(s.adapters_path)), name)
    if storage.kind(target) != "missing":
        raise InputError(f"{target} exists: adapters are immutable once served (replicas cache them); pick another name")
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(source, tmp) if storage.is_remote(source) else source
        storage.upload(local, target)
    say(f"adapter {name} is servable as model {s.model_id}:{name} ({target})", event="adapter",
        model=f"{s.model_id}:{name}", path=target)
    return record(cfg, action="adapter", name=name, model=f"{s.model_id}:{name}", source=source, path=target,
                  on_version=live["version"])
