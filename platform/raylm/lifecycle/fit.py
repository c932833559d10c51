"""Rollouts that fit the cluster: how `raylm promote` and `rollback` replace the replicas.

A rollout with surge (serve/options.py: ROLLOUT_SURGE_PERCENT) starts every new replica beside
the old ones: on a cluster without room for a second copy it never finishes. Before a rollout,
`plan_for` counts what the cluster has free now, per node (a replica's placement-group bundles
must fit on nodes), against what the new version's replicas need (the bundles Ray Serve LLM
reserves for the same LLMConfig that serve/app.py deploys), and picks Serve's `max_surge_percent`:

  surge         room for every new replica beside the old ones: all start, then the old stop (100)
  partial       room for k < N beside them: k at a time, each old replica stops only once a new
                one serves; capacity never drops (the largest percent whose surge is <= k)
  one-by-one    no room beside, N >= 2: Serve stops an old replica before starting its
                replacement (0), in batches of Serve's rolling_update_percentage (20%, at least
                1): the others serve meanwhile, so no request fails (capacity is a batch less)
  gap           no room beside, N = 1, --allow-gap: the one replica stops, then the new starts (0):
                the endpoint does not answer meanwhile. Without --allow-gap: refused (RolloutRefused)
  wait          a new replica does not fit even where an old one stood: surge as before; it waits
                for room (an autoscaler, other work ending) until serve.rollout_timeout_s, then reverts

Whatever the mode, a rollout not running by serve.rollout_timeout_s deploys the previous model
again with the same surge (rollout.py), so a rollout that stopped an old replica brings it back.

`plan_rollout` is the decision alone (dicts in, no Ray); `plan_for` gathers its inputs from Ray.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from raylm.errors import InputError

Resources = Mapping[str, float]
EPS = 1e-6


class RolloutRefused(InputError):
    """A rollout of the one replica with no room for a second copy, without --allow-gap (exit 2)."""


@dataclass(frozen=True)
class RolloutPlan:
    mode: str  # surge, partial, one-by-one, gap, wait
    max_surge_percent: int
    line: str  # what `raylm promote`/`rollback` says at the start: the mode and its numbers


# ------------------------------------------------------------------ placing bundles on nodes


def _fits(need: Resources, free: Resources) -> bool:
    return all(free.get(k, 0.0) + EPS >= v for k, v in need.items() if v > 0)


def _take(free: dict, need: Resources) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _sum(bundles: Sequence[Resources]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def place(bundles: Sequence[Resources], strategy: str, free: Mapping[str, Resources]) -> Optional[dict]:
    """Free resources per node once one replica's bundles are placed (Ray's placement-group
    strategies, first fit), or None when they do not fit."""
    nodes = {n: dict(r) for n, r in free.items()}
    if strategy in ("PACK", "STRICT_PACK"):  # one node if any can hold them all
        total = _sum(bundles)
        for r in nodes.values():
            if _fits(total, r):
                _take(r, total)
                return nodes
        if strategy == "STRICT_PACK":
            return None
    used: set[str] = set()
    for b in bundles:
        node = next((n for n, r in nodes.items() if _fits(b, r) and not (strategy == "STRICT_SPREAD" and n in used)),
                    None)
        if node is None:
            return None
        _take(nodes[node], b)
        used.add(node)
    return nodes


def room_for(bundles: Sequence[Resources], strategy: str, free: Mapping[str, Resources], most: int) -> int:
    """How many replicas (up to `most`) fit on the nodes' free resources together."""
    n, nodes = 0, dict(free)
    while n < most:
        placed = place(bundles, strategy, nodes)
        if placed is None:
            break
        n, nodes = n + 1, placed
    return n


# ------------------------------------------------------------------ the decision


def _res(r: Resources, keys: Sequence[str]) -> str:
    return ", ".join(f"{round(r.get(k, 0.0), 3) + 0.0:g} {k}" for k in keys) or "nothing"


def surge_percent(fit: int, replicas: int) -> int:
    """The largest max_surge_percent whose surge (Serve: ceil(percent * replicas / 100)) is <= fit."""
    return max(1, min(100, 100 * fit // replicas))


def plan_rollout(bundles: Sequence[Resources], strategy: str, replicas: int, free: Mapping[str, Resources],
                 freed: Optional[Mapping[str, Resources]], allow_gap: bool, headroom: Optional[Resources] = None,
                 last_rollout_s: Optional[float] = None, timeout_s: Optional[float] = None) -> RolloutPlan:
    """The rollout mode (module docstring) for `replicas` live replicas, each new one reserving
    `bundles` with `strategy`, given the free resources per node now (`free`) and once one old
    replica has stopped (`freed`; None: not known, taken as room). `headroom`: what an autoscaler
    may still add to the cluster (None: no autoscaler). `last_rollout_s`: how long the last rollout
    here took (said in a refusal). Raises RolloutRefused for one replica without room or `allow_gap`."""
    from raylm.serve.options import ROLLOUT_SURGE_PERCENT

    need = _sum(bundles)
    keys = [k for k, v in need.items() if v > 0]
    each = f"a replica reserves {_res(need, keys)}" + (f" in {len(bundles)} bundles ({strategy})" if len(bundles) > 1 else "")
    total_free = _sum(list(free.values()))
    largest = max(free.values(), key=lambda r: tuple(r.get(k, 0.0) for k in keys), default={})
    now = f"free now: {_res(total_free, keys)}" + (f" (the most on one node: {_res(largest, keys)})" if len(free) > 1 else "")
    if not bundles or replicas < 1:
        return RolloutPlan("surge", ROLLOUT_SURGE_PERCENT, f"rollout: {replicas} replicas running; new ones start "
                           "before old ones stop (surge)")
    fit = room_for(bundles, strategy, free, replicas)
    if fit >= replicas:
        return RolloutPlan("surge", ROLLOUT_SURGE_PERCENT, f"rollout with surge: room for all {replicas} new "
                           f"replica(s) beside the old ({each}; {now}); old replicas stop once the new ones serve")
    missing = {k: v * (replicas - fit) for k, v in need.items()}
    if headroom is not None and _fits(missing, headroom):
        return RolloutPlan("surge", ROLLOUT_SURGE_PERCENT, f"rollout with surge: room for {fit} of {replicas} new "
                           f"replica(s) beside the old ({each}; {now}); the autoscaler may add "
                           f"{_res(headroom, keys)}: old replicas stop once the new ones serve")
    deadline = f"serve.rollout_timeout_s={timeout_s:g} s" if timeout_s else "serve.rollout_timeout_s"
    if freed is not None and place(bundles, strategy, freed) is None:
        return RolloutPlan("wait", ROLLOUT_SURGE_PERCENT, f"rollout: the cluster has no room for a new replica, "
                           f"even where an old one stood ({each}; {now}): it waits for room (an autoscaler, other "
                           f"work ending) up to {deadline}, then the live model is deployed again")
    if fit >= 1:
        pct = surge_percent(fit, replicas)
        return RolloutPlan("partial", pct, f"rolling out {fit} replica(s) at a time (max_surge_percent {pct}): room "
                           f"for {fit} of {replicas} new replicas beside the old ({each}; {now}); an old replica "
                           "stops only once a new one serves")
    if replicas >= 2:
        from ray.serve._private.constants import DEFAULT_ROLLING_UPDATE_PERCENTAGE

        batch = max(int(DEFAULT_ROLLING_UPDATE_PERCENTAGE * replicas), 1)  # deployment_state.py _rollout_size
        return RolloutPlan("one-by-one", 0, f"rolling out replica by replica (max_surge_percent 0): no room for a "
                           f"new replica beside the {replicas} old ones ({each}; {now}); {batch} old replica(s) at a "
                           f"time drain and stop before their replacements start, {replicas - batch} serve meanwhile")
    took = f" (the last rollout here took {last_rollout_s:.0f} s)" if last_rollout_s else ""
    gap = (f"no room for a second copy of the one replica ({each}; {now}): the rollout stops the live replica "
           f"before the new one starts, and the endpoint does not answer while the new replica starts{took}")
    if not allow_gap:
        raise RolloutRefused(f"not rolled out: {gap}. --allow-gap accepts the gap; more replicas "
                             "(serve.autoscaling.min_replicas >= 2) or room for one more replica avoid it")
    return RolloutPlan("gap", 0, f"rollout with a gap (--allow-gap, max_surge_percent 0): {gap}")


# ------------------------------------------------------------------ its inputs, from Ray


def replica_bundles(s, checkpoint: str) -> tuple[list[dict], str]:
    """The placement-group bundles and strategy of one replica of the LLM deployment, as Ray Serve
    LLM derives them (LLMServer.get_deployment_options) from the LLMConfig serve/app.py builds: the
    engine's bundles (a CPU, or a GPU per tensor-parallel rank) with the replica actor's own
    resources (serve.num_cpus_per_replica) added to the first. ([], "") when Ray Serve LLM reserves
    no placement group up front (a TPU topology)."""
    from ray.llm._internal.serve.core.server.llm_server import _merge_replica_actor_and_child_actor_bundles

    from raylm.serve.app import llm_config

    config = llm_config(s, checkpoint, has_chat_template=True)
    engine = config.get_engine_config()
    if engine.accelerator.requires_deferred_placement_group:
        return [], ""
    actor = config.deployment_config.get("ray_actor_options", {})
    replica = {"CPU": actor.get("num_cpus", 1), "GPU": actor.get("num_gpus", 0), **actor.get("resources", {})}
    if "memory" in actor:
        replica["memory"] = actor["memory"]
    return _merge_replica_actor_and_child_actor_bundles(engine.placement_bundles, replica), engine.placement_strategy


def _live_replica_groups(app_name: str) -> list[dict]:
    """The placement groups of the LLM deployment's replicas (Serve names them after the replica)."""
    from ray.util import placement_group_table

    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT

    prefix = f"SERVE_REPLICA::{app_name}#{SERVE_MODEL_DEPLOYMENT}#"
    return [pg for pg in placement_group_table().values()
            if str(pg.get("name", "")).startswith(prefix) and pg.get("state") == "CREATED"]


def _free_per_node() -> dict[str, dict]:
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return {n: dict(r) for n, r in available_resources_per_node().items()}
    except Exception:  # noqa: BLE001 - a Ray without it: the cluster as one node
        return {"cluster": dict(ray.available_resources())}


def _headroom() -> Optional[dict]:
    """What the cluster's autoscaler may still add (its node groups' most, less what runs), or None."""
    import ray

    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001
        return None
    if not most:
        return None
    have = ray.cluster_resources()
    return {k: max(0.0, v - have.get(k, 0.0)) for k, v in most.items()}


def last_rollout_seconds(history: Sequence[dict]) -> Optional[float]:
    """How long the newest finished promote/rollback took, from its intent to its outcome."""
    intents = {e.get("id"): e for e in history if e.get("state") == "intent"}
    for e in reversed(history):
        start = intents.get(e.get("id"))
        if e.get("state") == "done" and start is not None:
            try:
                return (dt.datetime.fromisoformat(e["at"]) - dt.datetime.fromisoformat(start["at"])).total_seconds()
            except (KeyError, ValueError):
                return None
    return None


def plan_for(cfg, target, checkpoint: str, allow_gap: bool) -> RolloutPlan:
    """The plan for rolling `checkpoint` out with `target`'s serve settings into the app that
    `cfg` names, from the cluster as it is now. Ray must be initialised."""
    from ray import serve

    from raylm.lifecycle.history import read_history
    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT

    bundles, strategy = replica_bundles(target.serve, checkpoint)
    app = serve.status().applications.get(cfg.serve.app_name)
    deployment = app.deployments.get(SERVE_MODEL_DEPLOYMENT) if app else None
    replicas = int((deployment.replica_states or {}).get("RUNNING", 0)) if deployment else 0
    free = _free_per_node()
    groups = _live_replica_groups(cfg.serve.app_name)
    freed = None
    if groups:  # the free resources once one old replica (its placement group) is gone
        freed = {n: dict(r) for n, r in free.items()}
        pg = groups[0]
        for i, bundle in pg.get("bundles", {}).items():
            node = pg.get("bundles_to_node_id", {}).get(i)
            if node in freed:
                _take(freed[node], {k: -v for k, v in bundle.items()})
    return plan_rollout(bundles, strategy, replicas, free, freed, allow_gap, _headroom(),
                        last_rollout_seconds(read_history(cfg)), target.serve.rollout_timeout_s)
