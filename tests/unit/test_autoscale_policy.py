"""`serve.autoscaling.policy: engine`: the policy on hand-made Serve `AutoscalingContext`s (Ray's
own class, as the controller builds it), run bare and through Serve's own wrapper (bounds and
delays), the replica-side stats, and the config that selects it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve._private.autoscaling_state import _resolve_policy_callable
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.autoscaling_policy import _apply_autoscaling_config
from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingContext

from raylm.config import ConfigError, load_config
from raylm.config.loader import validate_tree
from raylm.serve.autoscale import (ENGINE_POLICY, KV_CACHE, RUNNING, WAITING, EngineLoad, EngineSignalPolicy,
                                   replica_stats)
from raylm.serve.options import serve_autoscaling

DEP = DeploymentID(name="LLMServer", app_name="raylm")


def context(replicas: list[tuple[float, float, float]], *, target: int | None = None, queued: float = 0.0,
            config: ServeAutoscalingConfig | None = None, now: float = 1000.0, state: dict | None = None
            ) -> AutoscalingContext:
    """A context for running replicas with (running, waiting, kv_cache) averages each."""
    ids = [ReplicaID(unique_id=f"r{i}", deployment_id=DEP) for i in range(len(replicas))]
    metrics = {RUNNING: {}, WAITING: {}, KV_CACHE: {}}
    for rid, (running, waiting, kv) in zip(ids, replicas):
        metrics[RUNNING][rid], metrics[WAITING][rid], metrics[KV_CACHE][rid] = running, waiting, kv
    n = len(replicas)
    return AutoscalingContext(
        deployment_id=DEP, deployment_name=DEP.name, app_name=DEP.app_name, current_num_replicas=n,
        target_num_replicas=n if target is None else target, running_replicas=ids,
        total_num_requests=sum(r + w for r, w, _ in replicas) + queued, total_queued_requests=queued,
        aggregated_metrics=lambda: metrics, raw_metrics=None, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=config.max_replicas if config else 4, policy_state=state or {},
        last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)


POLICY = EngineSignalPolicy(waiting_per_replica=0.0, kv_cache_high=0.9, kv_cache_low=0.5, max_num_seqs=2,
                            seq_fill=0.75)


def desired(*args, **kwargs) -> int:
    return POLICY(context(*args, **kwargs))[0]


def test_waiting_requests_scale_up_to_what_the_load_needs():
    assert desired([(2, 1, 0.1)]) == 2  # full batch, one waiting: one more replica
    assert desired([(2, 6, 0.1)]) == 4  # 8 requests at max_num_seqs=2: 4 replicas
    assert desired([(2, 1, 0.1), (2, 0, 0.1)]) == 3  # 5 requests over 2 replicas: 3
    assert desired([(2, 0, 0.1)], queued=3) == 3  # queued at Serve's handles counts as waiting


def test_kv_cache_pressure_scales_up_with_nothing_waiting():
    assert desired([(1, 0, 0.95)]) == 2
    assert desired([(1, 0, 0.2), (1, 0, 0.95)]) == 3  # the busiest replica decides


def test_idle_scales_down_and_busy_holds():
    assert desired([(0, 0, 0.0), (0, 0, 0.0)]) == 0  # Serve's min_replicas bound then holds
    assert desired([(1, 0, 0.1), (0, 0, 0.0)]) == 1  # 1 running fits one replica at 75% of 2
    assert desired([(2, 0, 0.1), (1, 0, 0.1)]) == 2  # 3 running need 2 replicas at 75% of 2
    assert desired([(2, 0, 0.7), (0, 0, 0.1)]) == 2  # KV between low and high: hold
    assert desired([(2, 0.5, 0.1)]) == 2 and EngineSignalPolicy(waiting_per_replica=1.0, max_num_seqs=2)(
        context([(2, 0.5, 0.1)]))[0] == 1  # the waiting threshold


def test_no_replicas_defers_to_serve_cold_start():
    assert desired([], target=1) == 1


def test_serve_wrapper_applies_the_delays(monkeypatch):
    """Through Serve's own wrapper, as the controller runs it (on its clock): a change is made
    only once it has been wanted for upscale/downscale_delay_s. (min/max_replicas are applied by
    the controller after the wrapper: the integration test sees them.)"""
    import ray.serve.autoscaling_policy as serve_policy

    clock = [0.0]
    monkeypatch.setattr(serve_policy, "time", SimpleNamespace(time=lambda: clock[0]))
    config = ServeAutoscalingConfig(min_replicas=1, max_replicas=2, upscale_delay_s=2.0, downscale_delay_s=5.0,
                                    policy={"policy_function": ENGINE_POLICY,
                                            "policy_kwargs": {"waiting_per_replica": 0.0, "max_num_seqs": 2}})
    policy = _apply_autoscaling_config(_resolve_policy_callable(config.policy))

    def tick(at_s: float, replicas: list, state: dict) -> tuple[int, dict]:
        clock[0] = at_s
        return policy(context(replicas, config=config, state=state))

    busy, idle = [(2, 2, 0.1)], [(0, 0, 0.0), (0, 0, 0.0)]
    n, state = tick(0.0, busy, {})
    assert n == 1  # wanted, not yet for upscale_delay_s
    n, state = tick(1.0, busy, state)
    assert n == 1
    n, state = tick(2.5, busy, state)
    assert n == 2
    n, state = tick(10.0, idle, state)
    assert n == 2  # idle, not yet for downscale_delay_s
    n, state = tick(12.0, [(0, 1, 0.0), (0, 0, 0.0)], state)
    assert n == 2  # a waiting request again: the downscale wait starts over (an upscale waits its delay)
    n, state = tick(13.0, idle, state)
    n, state = tick(17.0, idle, state)
    assert n == 2
    n, state = tick(18.5, idle, state)
    assert n == 1  # Serve keeps one replica when scaling down from 2; to 0 only from 1
    assert state["engine_signals"] == {"running": 0, "waiting": 0.0, "kv_cache": 0.0, "desired": 0}


def test_replica_stats_from_the_engine_scheduler():
    load = EngineLoad()
    assert replica_stats(load, 0) == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}
    load.record(SimpleNamespace(num_running_reqs=2, num_waiting_reqs=3, num_skipped_waiting_reqs=1,
                                kv_cache_usage=0.25), None)
    assert replica_stats(load, 6) == {RUNNING: 2.0, WAITING: 4.0, KV_CACHE: 0.25}
    assert replica_stats(load, 9)[WAITING] == 7.0  # sent by the frontend, not yet counted by the scheduler
    assert replica_stats(load, 0) == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}  # idle: stale counts dropped
    load.record(None, None)  # a step without scheduler stats keeps the last ones
    assert replica_stats(load, 6)[RUNNING] == 2.0


def test_config_selects_the_engine_policy_with_its_thresholds():
    cfg = load_config(None, ["serve.autoscaling.policy=engine", "serve.max_num_seqs=8",
                             "serve.autoscaling.engine_kv_cache_high=0.8"])
    options = serve_autoscaling(cfg.serve)
    assert options["policy"] == {"policy_function": ENGINE_POLICY, "policy_kwargs": {
        "waiting_per_replica": 1.0, "kv_cache_high": 0.8, "kv_cache_low": 0.5, "seq_fill": 0.75, "max_num_seqs": 8}}
    assert not any(k.startswith("engine_") for k in options)
    built = ServeAutoscalingConfig(**options)  # what Serve makes of it
    assert isinstance(_resolve_policy_callable(built.policy), EngineSignalPolicy)
    assert "policy" not in serve_autoscaling(load_config().serve)  # the default stays Serve's own
    custom = {"policy_function": "ray.serve.autoscaling_policy:replica_queue_length_autoscaling_policy",
              "policy_kwargs": {}}
    tree = {"serve": {"autoscaling": {"policy": custom}}}
    assert serve_autoscaling(validate_tree(tree, "test").serve)["policy"] == custom


@pytest.mark.parametrize("override, field", [
    ("serve.autoscaling.engine_kv_cache_high=1.5", "serve.autoscaling.engine_kv_cache_high"),
    ("serve.autoscaling.engine_kv_cache_low=0.95", "engine_kv_cache_low (0.95) must be <= engine_kv_cache_high"),
    ("serve.autoscaling.policy=engnie", "serve.autoscaling.policy"),
])
def test_bad_thresholds_name_the_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["serve.autoscaling.policy=engine", override])
    assert field in str(info.value)
