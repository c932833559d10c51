"""`raylm status`: what exists under the storage path (runs, sweeps, their best trial) and what
a reachable Ray cluster is serving. It reads files and asks Serve; it never starts a cluster."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.train.checkpoint import pick_resume_checkpoint


@dataclass
class RunInfo:
    name: str
    path: str
    step: int
    val_loss: Optional[float]
    resumes: int
    checkpoint: Optional[str]
    evaluation: Optional[dict] = None  # the newest step's eval.json (raylm eval)


@dataclass
class SweepInfo:
    name: str
    path: str
    trials: int
    best: Optional[dict]


def read_run(path: str) -> RunInfo:
    """The newest step, val_loss and resume count from metrics.jsonl (when there is one), and the
    newest complete checkpoint (whose manifest gives the step when there is no log)."""
    step, val_loss, resumes = 0, None, 0
    for rec in storage.read_run_log(path):
        if rec.get("event") == "resume":
            resumes += 1
        elif "step" in rec:
            step, val_loss = rec["step"], rec.get("val_loss", val_loss)
    picked = pick_resume_checkpoint(path, log=lambda _: None)
    if picked:
        step = max(step, int(picked[1]["step"]))
    return RunInfo(path.rstrip("/").rsplit("/", 1)[-1], path, step, val_loss, resumes, picked[0] if picked else None,
                   newest_evaluation(path))


def newest_evaluation(run: str) -> Optional[dict]:
    """The eval.json of the run's newest evaluated step folder (raylm eval writes it next to hf/)."""
    from raylm.evaluate import read_eval

    for step in storage.step_dirs(run):  # newest first
        found = read_eval(step)
        if found:
            return found
    return None


def sweep_evaluation(best: Optional[dict]) -> Optional[dict]:
    """The best checkpoint's evaluation: best.json's own (tune.evaluate_best), else its eval.json."""
    if not best:
        return None
    if isinstance(best.get("eval"), dict):
        return best["eval"]
    from raylm.evaluate import EVAL_JSON, eval_json_path, read_eval

    path = eval_json_path(best["checkpoint"])
    return read_eval(path[: -len(EVAL_JSON)].rstrip("/"))


def eval_line(result: dict) -> str:
    from raylm.evaluate import summary

    try:
        return f"eval: {summary(result)} ({result.get('created', '?')})"
    except (KeyError, TypeError, ValueError):
        return "eval: unreadable eval.json"


def find(root: str) -> tuple[list[RunInfo], list[SweepInfo]]:
    """Runs are folders with metrics.jsonl or checkpoints; sweeps are folders with a Tune
    experiment or best.json. Local folders and object storage alike; files beside them (a config,
    the promotion history) are not runs."""
    runs, sweeps = [], []
    for name in storage.list_dir(root, folders_only=True):
        path = storage.join(root, name)
        inside = storage.list_dir(path)
        if storage.METRICS_FILE in inside or any(n.startswith(storage.STEP_PREFIX) for n in inside):
            runs.append(read_run(path))
        elif "tune" in inside or storage.BEST_JSON in inside:
            n = len(storage.list_dir(storage.trials_dir(path)))
            best = storage.read_json(storage.best_json(path)) if storage.BEST_JSON in inside else None
            sweeps.append(SweepInfo(name, path, n, best))
    return runs, sweeps


def serving(cfg: RaylmConfig, address: Optional[str]) -> list[str]:
    """Lines describing Serve applications on a running cluster, or why there is none to ask."""
    import ray

    from raylm.cluster import running_cluster, use_cluster_token

    # the cluster the other verbs join (cluster.init_ray's order), with its token, from a fresh shell too
    target = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        target = target or running_cluster()  # several on this machine: an InputError naming them
        if not target or target == "local":
            return ["no running Ray cluster on this machine: nothing is being served (--address names one elsewhere)"]
        use_cluster_token(target)
        ray.init(address=target, namespace=cfg.cluster.namespace, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as exc:  # InputError is a ValueError
        return [f"no running Ray cluster reachable ({target or 'auto'}): nothing is being served "
                f"({str(exc).splitlines()[0]})"]
    try:
        from ray import serve

        apps = serve.status().applications
        if not apps:
            return ["Ray cluster up; no Serve application running"]
        lines = []
        for name, app in apps.items():
            replicas = ", ".join(f"{d}: {sum(dep.replica_states.values())} replica(s) {dict(dep.replica_states)}"
                                 for d, dep in app.deployments.items())
            state = getattr(app.status, "value", app.status)  # ApplicationStatus.RUNNING -> RUNNING
            lines.append(f"{name}: {state} — {replicas}")  # Serve's status overview has no route
            if name == cfg.serve.app_name:
                from raylm.lifecycle.rollout import version_check

                check = version_check(cfg)
                lines += [f"  {check}"] if check else []
        return lines
    except Exception as exc:  # noqa: BLE001 - status must report, not crash
        return [f"Ray cluster up; Serve not running ({type(exc).__name__})"]
    finally:
        ray.shutdown()


def history_lines(cfg: RaylmConfig, last: int = 8) -> list[str]:
    """The newest promotion-history entries, the live model marked."""
    from raylm.lifecycle.history import history_uri, live_entry, read_history

    history = read_history(cfg)
    if not history:
        return [f"none yet ({history_uri(cfg)})"]
    live = live_entry(history)
    lines = []
    for e in history[-last:]:
        what = e.get("checkpoint") or e.get("model")
        gate = e.get("metrics") or {}
        scores = f", {gate['metric']} {gate['candidate']:.4f} vs {gate['served']:.4f}" if gate.get("metric") else ""
        came = f" (from {e['from_version']})" if e.get("from_version") else ""
        state = f" ({e['state']})" if e.get("state", "done") != "done" else ""
        lines.append(f"{e['at']} {e['action']}{state} {e.get('version') or e.get('name')}{came}: {what}"
                     f"{scores}{' [forced]' if e.get('forced') else ''}{'  <- live' if e is live else ''}")
    return lines


def canary_line(cfg: RaylmConfig) -> Optional[str]:
    """The running canary and what each version answered so far (from storage: no Ray needed)."""
    from raylm.lifecycle.canary import describe_stats, read_stats
    from raylm.lifecycle.history import read_history, running_canary

    canary = running_canary(read_history(cfg))
    if canary is None:
        return None
    return (f"canary: {canary['version']} ({canary['checkpoint']}) serves {canary['percent']:g}% of conversations "
            f"beside {canary['from_version']} since {canary['at']}: {describe_stats(read_stats(cfg, canary))} "
            "(`raylm promote --finish` or `--abort`)")


def show_status(cfg: RaylmConfig, address: Optional[str] = None) -> int:
    root = storage.root(cfg.train.storage_path)
    print(f"storage: {root}")
    runs, sweeps = find(root)
    print(f"runs ({len(runs)}):")
    for r in runs:
        loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        print(f"  {r.name}: step {r.step}, val_loss {loss}, resumed {r.resumes}x, checkpoint {r.checkpoint or '-'}")
        if r.evaluation:
            print(f"    {eval_line(r.evaluation)} of {r.evaluation.get('checkpoint')}")
    print(f"sweeps ({len(sweeps)}):")
    for s in sweeps:
        if s.best:
            b = s.best
            print(f"  {s.name}: {s.trials} trial(s), best {b['trial_id']} {b['metric']}={b['value']:.4f} "
                  f"params={b['params']} -> {b['checkpoint']}")
            evaluation = sweep_evaluation(b)
            if evaluation:
                print(f"    {eval_line(evaluation)}")
        else:
            print(f"  {s.name}: {s.trials} trial(s), no best yet")
    print(f"models served by {cfg.serve.app_name} (promotion history):")
    for line in history_lines(cfg):
        print(f"  {line}")
    canary = canary_line(cfg)
    if canary:
        print(canary)
    print("serving:")
    for line in serving(cfg, address):
        print(f"  {line}")
    return 0
