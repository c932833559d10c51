"""Rollouts: a new model into the live app in place, and the verbs that do it (serve, promote,
rollback).

A rollout redeploys the Serve app in place over another checkpoint. Serve's rolling update with
surge (serve/options.py) starts the new replicas and waits for their health check while the old
ones keep serving, then drains the old ones; responses name their version
(`x-raylm-model-version`). A rollout that fails (the engine cannot load the checkpoint) is undone
by deploying the previous inputs again: their replicas never stopped, and the pinned code version
(serve/app.py `build_app`) leaves them untouched.
"""

from __future__ import annotations

from typing import Any, Optional

from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import InputError, ServeDeployError
from raylm.lifecycle.eval_gate import PromotionRefused, compare, eval_results, same_eval_set
from raylm.lifecycle.history import (MODEL_ACTIONS, history_uri, live_entry, next_version, read_history,
                                     record)
from raylm.serve.auth import KeySetup


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
    from raylm.serve.app import deploy

    try:
        deploy(cfg, checkpoint, version)
    except Exception as exc:  # noqa: BLE001 - any failure: the old model must keep serving
        kept = ""
        if previous is not None:
            try:
                deploy(cfg, previous["checkpoint"], previous["version"])
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
    from raylm.serve.app import deploy

    history = read_history(cfg)
    live = live_entry(history)
    version = next_version(history)
    url, keys = deploy(cfg, checkpoint, version)
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


def require_live(cfg: RaylmConfig) -> tuple[list[dict], dict]:
    history = read_history(cfg)
    live = live_entry(history)
    if live is None:
        raise InputError(f"no model has been served from {history_uri(cfg)}: start the endpoint with `raylm serve` "
                         "(same config) first")
    return history, live


def require_serving(cfg: RaylmConfig) -> None:
    if not is_serving(cfg):
        raise InputError(f"serve app {cfg.serve.app_name!r} is not running on this Ray cluster: start it with "
                         "`raylm serve`, or join its cluster (--address, cluster.address or RAY_ADDRESS)")


def promote(cfg: RaylmConfig, candidate: str, force: bool = False) -> dict:
    """`raylm promote`: evaluate the candidate and the served model on the same eval set, roll the
    candidate out if it passes the gate (or `force`), and record it. Ray must be initialised."""
    history, live = require_live(cfg)
    require_serving(cfg)
    metrics: dict[str, Any] = {}
    if not force:
        ours, theirs = eval_results(cfg, candidate, live["checkpoint"])
        same_eval_set(ours, theirs)
        passed, line = compare(cfg.serve.promote.metric, cfg.serve.promote.tolerance, ours, theirs)
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
    history, live = require_live(cfg)
    if not live.get("from_checkpoint"):
        raise InputError(f"{live['version']} ({live['checkpoint']}) is the first model served here: nothing to roll "
                         f"back to ({history_uri(cfg)})")
    require_serving(cfg)
    back = {"version": live["from_version"], "checkpoint": live["from_checkpoint"]}
    earlier = next((e for e in reversed(history) if e.get("action") in MODEL_ACTIONS
                    and e.get("version") == back["version"]), {})
    say(f"rolling {back['version']} ({back['checkpoint']}) back out, replacing {live['version']}", event="rollout",
        version=back["version"])
    rollout(cfg, back["checkpoint"], back["version"], live)
    return record(cfg, action="rollback", version=back["version"], checkpoint=back["checkpoint"],
                  from_version=live["version"], from_checkpoint=live["checkpoint"],
                  **({"from_entry": earlier.get("at")} if earlier else {}))
