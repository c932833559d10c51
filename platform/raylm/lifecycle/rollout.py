"""Rollouts: a new model into the live app in place, and the verbs that do it (serve, promote,
rollback).

A rollout redeploys the Serve app in place over another checkpoint. Serve's rolling update with
surge (serve/options.py) starts the new replicas and waits for their health check while the old
ones keep serving, then drains the old ones; responses name their version
(`x-raylm-model-version`). A rollout that fails (the engine cannot load the checkpoint) is undone
by deploying the previous inputs again: their replicas never stopped, and the pinned code version
(serve/app.py `build_app`) leaves them untouched. On a cluster without room for a second copy the
rollout goes replica by replica, or with a gap when there is one replica and --allow-gap
(lifecycle/fit.py); the previous inputs are then deployed again with the same surge, which brings
back the replicas that stopped.
"""

from __future__ import annotations

import signal
import threading
import uuid
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import InputError, ServeDeployError
from raylm.lifecycle.eval_gate import PromotionRefused, gate
from raylm.lifecycle.fit import plan_for
from raylm.lifecycle.history import (MODEL_ACTIONS, history_uri, is_done, live_entry, next_version,
                                     read_history, record, refuse_while_running, unfinished)
from raylm.lifecycle.lock import promotion_lock
from raylm.lifecycle.record import deployment, set_paths, without_checkpoint, write_record
from raylm.serve.auth import KeySetup


def is_serving(cfg: RaylmConfig) -> bool:
    """Whether the app runs on the Ray cluster this process is connected to."""
    from ray import serve

    try:
        app = serve.status().applications.get(cfg.serve.app_name)
    except Exception:  # noqa: BLE001 - no Serve on this cluster
        return False
    return app is not None and app.status in ("RUNNING", "DEPLOYING", "UNHEALTHY")


def rollout(cfg: RaylmConfig, checkpoint: str, version: str, previous: Optional[dict],
            keys: Optional[KeySetup] = None, timeout_s: Optional[float] = None,
            restore: Optional[tuple[RaylmConfig, Optional[KeySetup]]] = None,
            max_surge_percent: Optional[int] = None) -> KeySetup:
    """Put `checkpoint` into the live app as `version`, in place (with the deployment record's
    config and `keys`); on failure deploy `previous` again (which never stopped serving) and raise
    `ServeDeployError` naming the checkpoint; so is one not running after `timeout_s`
    (serve.rollout_timeout_s). `restore`: the config and keys `previous` was deployed with, when
    this rollout changes them (`--reconfigure`): the same inputs leave its replicas untouched.
    `max_surge_percent`: the rollout's surge (lifecycle/fit.py), the revert's too. Returns the keys
    the app was bound to."""
    from raylm.serve.app import deploy

    try:
        return deploy(cfg, checkpoint, version, keys, timeout_s, max_surge_percent=max_surge_percent)[1]
    except Exception as exc:  # noqa: BLE001 - any failure: the old model must keep serving
        kept = ""
        if previous is not None:
            try:
                before, before_keys = restore or (cfg, keys)
                deploy(before, previous["checkpoint"], previous["version"], before_keys,
                       max_surge_percent=max_surge_percent)
                kept = f"; {previous['version']} ({previous['checkpoint']}) keeps serving"
            except Exception as again:  # noqa: BLE001
                kept = f"; restoring {previous['version']} failed too: {again}"
        raise ServeDeployError(f"rollout of {checkpoint} failed: {_first_line(exc)}{kept}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM during a rollout, handled like Ctrl-C: recorded, and the previous model restored."""


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises Terminated (a KeyboardInterrupt) while the rollout runs, so a `kill` (CI
    cancelling a job) is recorded like Ctrl-C instead of leaving an intent with no outcome."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(f"signal {signum}")

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def change_model(cfg: RaylmConfig, action: str, target: RaylmConfig, keys: Optional[KeySetup], kept: list[str],
                 checkpoint: str, version: str, live: dict, max_surge_percent: Optional[int] = None,
                 **fields: Any) -> dict:
    """Roll `checkpoint` out as `version` and record it: an intent entry first, then the outcome.
    Call with the app's promotion lock held. A failed rollout (the previous model restored by
    `rollout`) is recorded as failed; Ctrl-C or SIGTERM as interrupted, after the previous model
    is deployed again (its replicas never stopped: the new ones are dropped)."""
    restore = deployment(cfg, check=False)[:2]  # what serves now: the record's config and keys
    op = uuid.uuid4().hex[:12]
    move = {"action": action, "id": op, "version": version, "checkpoint": checkpoint,
            "from_version": live["version"], "from_checkpoint": live["checkpoint"]}
    record(cfg, state="intent", **move)
    try:
        with _terminate_as_interrupt():
            keys = rollout(target, checkpoint, version, live, keys, cfg.serve.rollout_timeout_s, restore,
                           max_surge_percent)
    except ServeDeployError as exc:
        record(cfg, state="failed", error=str(exc), **move)
        raise
    except KeyboardInterrupt as exc:
        restored = _restore(*restore, live, max_surge_percent)
        record(cfg, state="interrupted", signal=str(exc) or "SIGINT", restored=restored is None,
               **({"error": restored} if restored else {}), **move)
        say(f"interrupted: {version} not rolled out; "
            f"{live['version'] + ' serves' if restored is None else 'restoring failed: ' + restored} "
            f"(recorded in {history_uri(cfg)})", event="interrupted", version=version)
        raise
    try:
        write_record(target, checkpoint, version, keys, kept)
    finally:  # the model is live: the history says so even if the record could not be written
        entry = record(cfg, state="done", **move, **fields)
    return entry


def _restore(cfg: RaylmConfig, keys: Optional[KeySetup], live: dict,
             max_surge_percent: Optional[int] = None) -> Optional[str]:
    """Deploy the live entry's model again; None when it serves, else why not."""
    from raylm.serve.app import deploy

    try:
        deploy(cfg, live["checkpoint"], live["version"], keys, max_surge_percent=max_surge_percent)
        return None
    except BaseException as exc:  # noqa: BLE001 - a second Ctrl-C included: say what happened
        return _first_line(exc)


def served_version(cfg: RaylmConfig) -> Optional[str]:
    """The model version Serve's controller has for the app (its target while a rollout runs),
    from the model deployment's init arguments; None when the app is not there."""
    from raylm.serve.options import deployment_info

    info = deployment_info(cfg.serve)
    return None if info is None else (info.replica_config.init_kwargs or {}).get("model_version")


def version_check(cfg: RaylmConfig) -> Optional[str]:
    """A line saying whether Serve's model version for the app is the one the promotion history
    says is live (`raylm status`); None when Serve has no such app."""
    served = served_version(cfg)
    if served is None:
        return None
    history = read_history(cfg)
    live, pending = live_entry(history), unfinished(history)
    said = live["version"] if live else None
    if served == said:
        return f"model version {served}: Serve and the promotion history agree"
    why = (f"; an unfinished {pending['action']} of {pending['version']} (intent at {pending['at']}, no outcome: "
           "its command was killed)" if pending else "")
    return (f"MISMATCH: Serve runs model version {served}, the promotion history ({history_uri(cfg)}) says "
            f"{said}{why}; `raylm promote --force` or `raylm rollback` puts a recorded model back")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:500] if text else type(exc).__name__


# ------------------------------------------------------------------ the verbs


def deploy_recorded(cfg: RaylmConfig, checkpoint: str, overrides: Iterable[str] = ()) -> tuple[str, KeySetup]:
    """Deploy as the next model version, record it in the promotion history, and write the
    deployment record (config, `--set` paths `overrides`, key hashes) that `raylm promote` and
    `rollback` deploy from."""
    from raylm.serve.app import deploy

    with promotion_lock(cfg, "deploy"):
        history = read_history(cfg)
        live = live_entry(history)
        version = next_version(history)
        cfg = without_checkpoint(cfg)
        url, keys = deploy(cfg, checkpoint, version, fresh_env=True)
        write_record(cfg, checkpoint, version, keys, set_paths(overrides))
        record(cfg, action="deploy", state="done", version=version, checkpoint=checkpoint,
               from_version=live["version"] if live else None, from_checkpoint=live["checkpoint"] if live else None)
    return url, keys


def run_serve(cfg: RaylmConfig, checkpoint: str, blocking: bool, overrides: Iterable[str] = ()) -> int:
    """`raylm serve`: deploy, print the URL/key location/examples; block until Ctrl-C if asked."""
    from raylm.serve.app import banner, direct_urls, serve_until_interrupted

    url, keys = deploy_recorded(cfg, checkpoint, overrides)
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


def promote(cfg: RaylmConfig, candidate: str, force: bool = False, overrides: Iterable[str] = (),
            reconfigure: bool = False, allow_gap: bool = False) -> dict:
    """`raylm promote`: evaluate the candidate and the served model on the same eval set, roll the
    candidate out if it passes the gate (or `force`) with the deployment record's config and keys
    (`overrides`: this command's `--set`; see record.deployment), and record it. Ray must be
    initialised. Holds the app's promotion lock from reading the live model to recording the
    outcome (another promote meanwhile is refused, naming this one). Without room on the cluster
    for a second copy of one replica, refused after the gate (whose eval engines use the cluster
    too), before anything changes, unless `allow_gap` (lifecycle/fit.py)."""
    with promotion_lock(cfg, "promote"):
        return _promote(cfg, candidate, force, overrides, reconfigure, allow_gap)


def gated(cfg: RaylmConfig, candidate: str, force: bool, overrides: Iterable[str], reconfigure: bool,
          verb: str) -> tuple[list[dict], dict, tuple[RaylmConfig, Optional[KeySetup], list[str]], dict]:
    """What a promote (or a canary) checks before it changes anything, under the app's lock: a
    live model, no canary running, the deployment record (and this command's serve settings
    against it), the app serving, and the eval gate unless `force` (PromotionRefused). Returns the
    history, the live entry, the record's (config, keys, kept --set paths) and the gate's metrics."""
    history, live = require_live(cfg)
    refuse_while_running(cfg, history, verb)
    deployed = deployment(cfg, overrides, reconfigure)
    require_serving(cfg)
    metrics: dict[str, Any] = {}
    if not force:
        passed, line, metrics = gate(cfg, candidate, live["checkpoint"])
        if not passed:
            raise PromotionRefused(f"not promoted: {line}; {live['version']} keeps serving (--force overrides)")
        say(f"gate passed: {line}", event="gate", **metrics)
    return history, live, deployed, metrics


def _promote(cfg: RaylmConfig, candidate: str, force: bool, overrides: Iterable[str], reconfigure: bool,
             allow_gap: bool = False) -> dict:
    from raylm.serve.app import live_drain_s

    history, live, (target, keys, kept), metrics = gated(cfg, candidate, force, overrides, reconfigure, "promote")
    plan = plan_for(cfg, target, candidate, allow_gap)  # no room and one replica: refused here, nothing changed yet
    version = next_version(history)
    drain = live_drain_s(cfg.serve)  # what the live replicas were deployed with
    drain = cfg.serve.graceful_shutdown_timeout_s if drain is None else drain
    say(f"rolling {candidate} out as {version} (replacing {live['version']}; old replicas drain for up to "
        f"{drain:g} s)", event="rollout", version=version)
    say(plan.line, event="rollout_mode", mode=plan.mode, max_surge_percent=plan.max_surge_percent)
    return change_model(cfg, "promote", target, keys, kept, candidate, version, live, plan.max_surge_percent,
                        metrics=metrics, forced=force, rollout_mode=plan.mode)


def rollback(cfg: RaylmConfig, allow_gap: bool = False) -> dict:
    """`raylm rollback`: roll the model served before the live one back out (no gate), under the
    app's promotion lock; `allow_gap` as for `promote`."""
    with promotion_lock(cfg, "rollback"):
        return _rollback(cfg, allow_gap)


def _rollback(cfg: RaylmConfig, allow_gap: bool = False) -> dict:
    history, live = require_live(cfg)
    refuse_while_running(cfg, history, "rollback")
    if not live.get("from_checkpoint"):
        raise InputError(f"{live['version']} ({live['checkpoint']}) is the first model served here: nothing to roll "
                         f"back to ({history_uri(cfg)})")
    require_serving(cfg)
    back = {"version": live["from_version"], "checkpoint": live["from_checkpoint"]}
    earlier = next((e for e in reversed(history) if e.get("action") in MODEL_ACTIONS and is_done(e)
                    and e.get("version") == back["version"]), {})
    target, keys, kept = deployment(cfg, check=False)  # the record's config: only the model changes
    plan = plan_for(cfg, target, back["checkpoint"], allow_gap)
    say(f"rolling {back['version']} ({back['checkpoint']}) back out, replacing {live['version']}", event="rollout",
        version=back["version"])
    say(plan.line, event="rollout_mode", mode=plan.mode, max_surge_percent=plan.max_surge_percent)
    return change_model(cfg, "rollback", target, keys, kept, back["checkpoint"], back["version"], live,
                        plan.max_surge_percent, rollout_mode=plan.mode, **({"from_entry": earlier.get("at")} if earlier else {}))
