"""A rollout on a cluster without room for a second copy, with two replicas, against real vLLM
engines: lifecycle/fit.py plans it replica by replica (Serve's max_surge_percent 0), and under
load no request fails while at least one replica serves throughout.

Opt-in (RAYLM_EXTENDED=1): it starts four replicas (3:39 on the 2-core machine, Dec 7: the app
with 2 replicas in 61 s, the rollout in 102 s, 1321 requests, none failed). The suite checks the
one-replica case (a refusal, then --allow-gap) in test_lifecycle.py, and this mode's Serve
options and plan in tests/unit/test_rollout_fit.py.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from serve_fixtures import key_file, serve_config, shutdown_serve, tiny_checkpoint, wait_until
from test_lifecycle import Load, llm_replicas

__all__ = ["key_file", "tiny_checkpoint"]  # fixtures used by this module


@pytest.mark.extended
def test_two_replicas_on_a_full_cluster_roll_replica_by_replica_with_no_failed_request(
        ray_cluster, tiny_checkpoint, key_file, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raylm.lifecycle import fit, rollout

    cfg = serve_config(key_file, f"train.storage_path={tmp_path}", "serve.autoscaling.min_replicas=2",
                       "serve.autoscaling.max_replicas=2", "serve.replica_start_attempts=1",
                       "serve.graceful_shutdown_timeout_s=20")
    other = str(shutil.copytree(tiny_checkpoint, tmp_path / "other"))  # another path: another version
    try:
        url, _ = rollout.deploy_recorded(cfg, tiny_checkpoint)
        assert wait_until(lambda: llm_replicas(cfg) == 2, timeout_s=300)
        full = placement_group([{"CPU": ray.available_resources()["CPU"]}])  # every free CPU
        ray.get(full.ready(), timeout=60)
        counts, stop = [], threading.Event()

        def watch() -> None:
            while not stop.is_set():
                counts.append(llm_replicas(cfg))
                time.sleep(0.5)

        try:
            plan = fit.plan_for(cfg, cfg, other, allow_gap=False)
            assert (plan.mode, plan.max_surge_percent) == ("one-by-one", 0), plan
            threading.Thread(target=watch, daemon=True).start()
            with Load(url) as load:
                time.sleep(2)
                entry = rollout.promote(cfg, other, force=True)
                done = time.monotonic()
                time.sleep(3)
        finally:
            stop.set()
            remove_placement_group(full)
        assert load.failures == [], load.failures[:3]
        assert entry["rollout_mode"] == "one-by-one" and entry["version"] == "v2"
        assert load.versions_after(done + 1) == {"v2"}
        assert min(counts) >= 1, "a replica served throughout"
    finally:
        shutdown_serve()
