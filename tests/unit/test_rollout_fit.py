"""Rollouts that fit the cluster (lifecycle/fit.py): the mode a rollout takes from the free
resources per node, the new replicas' bundles, the replica count and --allow-gap; and the surge a
failed rollout is reverted with. Without Ray."""

from __future__ import annotations

import math

import pytest

from raylm.lifecycle import fit

ONE_CPU = [{"CPU": 1.0, "GPU": 0}]  # a CPU replica: the engine's bundle, serve.num_cpus_per_replica=0


def plan(free, replicas, freed=None, allow_gap=False, bundles=ONE_CPU, strategy="PACK", **kw):
    nodes = {f"n{i}": {"CPU": c} for i, c in enumerate(free)}
    after = None if freed is None else {f"n{i}": {"CPU": c} for i, c in enumerate(freed)}
    return fit.plan_rollout(bundles, strategy, replicas, nodes, after, allow_gap, **kw)


def test_room_for_every_new_replica_beside_the_old_is_a_surge():
    p = plan([2.0], replicas=2, freed=[3.0])
    assert (p.mode, p.max_surge_percent) == ("surge", 100)
    assert "room for all 2" in p.line and "1 CPU" in p.line and "free now: 2 CPU" in p.line


def test_room_for_some_surges_that_many_at_a_time():
    p = plan([1.0], replicas=3, freed=[2.0])
    assert p.mode == "partial" and p.max_surge_percent == 33
    assert math.ceil(33 * 3 / 100) == 1, "Serve starts ceil(percent * replicas / 100) at once: the 1 that fits"


@pytest.mark.parametrize("replicas", range(1, 40))
def test_the_partial_surge_never_starts_more_than_fit(replicas):
    for room in range(1, replicas):
        pct = fit.surge_percent(room, replicas)
        serve_surge = (pct * replicas + 99) // 100  # deployment_state.py _surge_replicas_to_start
        assert 1 <= serve_surge <= room


def test_no_room_with_two_replicas_goes_replica_by_replica():
    assert "2 old replica(s) at a time" in plan([0.0], replicas=10, freed=[1.0]).line, "Serve's 20% batches"
    p = plan([0.0], replicas=2, freed=[1.0])
    assert (p.mode, p.max_surge_percent) == ("one-by-one", 0)
    assert "replica by replica" in p.line and "1 old replica(s) at a time" in p.line and "1 serve meanwhile" in p.line and "free now: 0 CPU" in p.line


def test_one_replica_without_room_is_refused_naming_the_gap_and_allow_gap():
    with pytest.raises(fit.RolloutRefused) as err:
        plan([0.5], replicas=1, freed=[1.5], last_rollout_s=48)
    text = str(err.value)
    assert "--allow-gap" in text and "does not answer" in text and "48 s" in text
    assert "a replica reserves 1 CPU" in text and "free now: 0.5 CPU" in text


def test_allow_gap_rolls_the_one_replica_with_no_surge():
    p = plan([0.0], replicas=1, freed=[1.0], allow_gap=True)
    assert (p.mode, p.max_surge_percent) == ("gap", 0) and "--allow-gap" in p.line


def test_a_replica_that_fits_nowhere_even_in_an_old_ones_place_waits_for_the_deadline():
    """No mode makes room (here: a reconfigured replica asking for 65 CPUs): nothing old is stopped,
    the rollout waits with surge until serve.rollout_timeout_s reverts it."""
    p = plan([3.0], replicas=1, freed=[4.0], bundles=[{"CPU": 65.0}], timeout_s=8)
    assert (p.mode, p.max_surge_percent) == ("wait", 100) and "serve.rollout_timeout_s=8 s" in p.line


def test_a_bundle_must_fit_on_one_node_not_across_the_free_total():
    p = plan([0.6, 0.6], replicas=2, freed=[1.6, 0.6])
    assert p.mode == "one-by-one", "1.2 CPUs free in all, but no node has the 1 a bundle needs"
    assert "the most on one node: 0.6 CPU" in p.line


def test_tensor_parallel_bundles_follow_the_placement_strategy():
    bundles = [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    nodes = {"a": {"GPU": 1.0, "CPU": 4.0}, "b": {"GPU": 1.0, "CPU": 4.0}}
    assert fit.room_for(bundles, "PACK", nodes, 2) == 1, "PACK spreads over nodes when no one node holds all"
    assert fit.room_for(bundles, "STRICT_PACK", nodes, 2) == 0
    assert fit.room_for(bundles, "STRICT_PACK", {"a": {"GPU": 4.0, "CPU": 4.0}}, 3) == 2


def test_an_autoscaler_that_can_add_the_room_keeps_the_surge():
    p = plan([0.0], replicas=1, freed=[1.0], headroom={"CPU": 8.0})
    assert (p.mode, p.max_surge_percent) == ("surge", 100) and "autoscaler may add 8 CPU" in p.line
    assert plan([0.0], replicas=2, freed=[1.0], headroom={"CPU": 1.0}).mode == "one-by-one"


def test_no_running_replica_is_a_surge():
    assert plan([0.0], replicas=0).mode == "surge"


def test_replica_bundles_are_ray_serve_llms_for_the_same_config():
    """One CPU for the engine plus serve.num_cpus_per_replica for the replica actor, in its first bundle;
    a GPU per tensor-parallel rank."""
    from raylm.config import load_config

    cpu = load_config(None, ["serve.num_cpus_per_replica=0.5"]).serve
    assert fit.replica_bundles(cpu, "/ckpt") == ([{"CPU": 1.5, "GPU": 0}], "PACK")
    gpu = load_config(None, ["serve.use_gpu=true", "serve.tensor_parallel_size=2"]).serve
    bundles, strategy = fit.replica_bundles(gpu, "/ckpt")
    assert [b.get("GPU") for b in bundles] == [1, 1] and strategy == "PACK"


def test_last_rollout_seconds_from_the_history():
    history = [{"id": "a", "state": "intent", "at": "2026-01-01T00:00:00+00:00"},
               {"id": "a", "state": "done", "at": "2026-01-01T00:00:42+00:00"},
               {"id": "b", "state": "intent", "at": "2026-01-01T01:00:00+00:00"},
               {"id": "b", "state": "failed", "at": "2026-01-01T01:15:00+00:00"}]
    assert fit.last_rollout_seconds(history) == 42
    assert fit.last_rollout_seconds([]) is None


def test_a_failed_rollout_is_reverted_with_its_own_surge(monkeypatch):
    """A rollout with no surge stopped an old replica before it failed: the previous model is
    deployed again with no surge too (with surge, Serve would keep a new replica that runs and wait
    for room for the old one beside it: forever on a full cluster)."""
    import raylm.serve.app as app
    from raylm.config import load_config
    from raylm.errors import ServeDeployError
    from raylm.lifecycle import rollout

    calls = []

    def deploy(cfg, checkpoint, version="", keys=None, timeout_s=None, max_surge_percent=None):
        calls.append((checkpoint, timeout_s, max_surge_percent))
        if checkpoint == "/new":
            raise ServeDeployError("not running after serve.rollout_timeout_s=8 s")
        return "http://x", keys

    monkeypatch.setattr(app, "deploy", deploy)
    with pytest.raises(ServeDeployError, match="v1 .*keeps serving"):
        rollout.rollout(load_config(), "/new", "v2", {"checkpoint": "/old", "version": "v1"}, timeout_s=8,
                        max_surge_percent=0)
    assert calls == [("/new", 8, 0), ("/old", None, 0)]
    calls.clear()
    assert rollout._restore(load_config(), None, {"checkpoint": "/old", "version": "v1"}, 0) is None
    assert calls == [("/old", None, 0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.mark.parametrize("edge", [True, False])
def test_the_plans_surge_reaches_serves_deployment_config_and_restarts_no_replica(monkeypatch, checkpoint, edge):
    """What a plan decides is Serve's max_surge_percent on the LLM deployment (Serve's rolling update:
    0 stops an old replica before its replacement starts, deployment_state.py), and it is no part of
    the deployment's version: the same inputs with another surge leave the running replicas alone."""
    import types

    import ray

    from raylm.config import load_config
    from raylm.serve import app
    from raylm.serve.auth import KeySetup
    from raylm.serve.options import ROLLOUT_SURGE_PERCENT

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env={}))
    cfg = load_config(None, ["serve.model_id=tiny-test", f"serve.edge.enabled={str(edge).lower()}"])
    keys = KeySetup(hashes=("h",), source="test", generated_file=None)

    def llm_deployment(max_surge_percent):
        built = app.build_app(cfg, checkpoint, keys, model_version="v2", max_surge_percent=max_surge_percent)
        bound = built._bound_deployment
        if edge:  # the edge's first argument: the LLM deployment's application
            bound = bound.init_args[0]._bound_deployment
        return bound

    default, none, some = llm_deployment(None), llm_deployment(0), llm_deployment(33)
    assert default._deployment_config.max_surge_percent == ROLLOUT_SURGE_PERCENT
    assert none._deployment_config.max_surge_percent == 0 and some._deployment_config.max_surge_percent == 33
    assert default._version == none._version == some._version
    assert none._replica_config.placement_group_bundles == fit.replica_bundles(cfg.serve, checkpoint)[0]


def test_a_promote_from_another_shell_or_with_other_promote_settings_restarts_nothing(monkeypatch, checkpoint):
    """The replicas a promote leaves alone see the same inputs whoever deploys: the promote-time
    settings (serve.canary, serve.promote, serve.rollout_timeout_s) are no part of a deployment's
    version, and a deployment given the live app's runtime env has it exactly, whatever the
    deploying process's environment (a second shell without HF_HOME, a job with a working_dir)."""
    import types

    import ray

    from raylm.config import load_config
    from raylm.serve import app
    from raylm.serve.auth import KeySetup
    from raylm.serve.options import CANARY_DEPLOYMENT, EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT

    keys = KeySetup(hashes=("h",), source="test", generated_file=None)
    live_env = {"env_vars": {"HF_HOME": "/serving/shell", "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:1"}}
    spec = app.CanarySpec(checkpoint=checkpoint, version="v3", percent=30.0, id="c1", stats_uri="/tmp/x")

    def deployments(sets: list[str], job_env: dict, envs: dict | None) -> dict:
        monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env=job_env))
        cfg = load_config(None, ["serve.model_id=tiny-test", *sets])
        edge = app.build_app(cfg, checkpoint, keys, model_version="v2", canary=spec, runtime_envs=envs)._bound_deployment
        llm, cand = (a._bound_deployment for a in (edge.init_args[0], edge.init_kwargs["canary"]))
        return {EDGE_DEPLOYMENT: edge, SERVE_MODEL_DEPLOYMENT: llm, CANARY_DEPLOYMENT: cand}

    served = deployments([], {"env_vars": {"HF_HOME": "/serving/shell"}}, None)
    envs = {EDGE_DEPLOYMENT: live_env, SERVE_MODEL_DEPLOYMENT: live_env}
    promoting = deployments(["serve.canary.auto=true", "serve.promote.tolerance=0.5",
                             "serve.rollout_timeout_s=9"], {"env_vars": {}, "working_dir": "gcs://pkg.zip"}, envs)
    for name, d in promoting.items():
        assert d._version == served[name]._version, name
        assert d._replica_config.ray_actor_options["runtime_env"] == live_env, name  # the canary: the model's env
    # without the live app's envs (raylm serve), each deployment has the deploying job's
    assert "HF_HOME" in str(served[SERVE_MODEL_DEPLOYMENT]._replica_config.ray_actor_options["runtime_env"])
