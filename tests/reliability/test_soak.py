"""Opt-in soak (RAYLM_SOAK=1): the CI tests' faults, longer and repeated.

- training: 120 steps with a worker SIGKILLed four times at random steps; the final weights
  equal a fault-free run's;
- serving: a 90 s burst with a replica SIGKILLed every 30 s; under 1% of requests fail (client
  retries on 503 only) and the deployment is back to its replica count after each kill;
- hostile input: 1000 fuzzed requests per endpoint.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import threading
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from reliability_helpers import (Background, completes, deploy, fit, healthy, hf_weights, kill_pid, last_step,
                                 read_log, replica_actors, run_dir, running_replicas, serve_config, train_config,
                                 train_workers, wait_for)
from test_hostile_input import check, encode, post, request_bodies
from test_serve_faults import complete

from raylm.serve.protocol import CompletionRequest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SOAK_STEPS, SOAK_CKPT = 120, 10


def test_soak_four_worker_kills_then_equal_to_a_fault_free_run(tmp_path, prepared):
    over = {"train.max_steps": SOAK_STEPS, "train.checkpoint_every_steps": SOAK_CKPT, "train.eval_every_steps": 60,
            "train.keep_checkpoints": 20, "train.max_failures": 4}
    rng = random.Random(os.environ.get("RAYLM_FAULT_SEED") or time.time_ns())
    cfg = train_config(tmp_path / "faulty", "soak", **over)
    job = Background(lambda: fit(cfg, prepared))
    for kill in range(4):
        resumes = sum(1 for r in read_log(run_dir(cfg)) if r.get("event") == "resume")
        assert resumes == kill
        target = min(SOAK_STEPS - 5, last_step(read_log(run_dir(cfg))) + rng.randint(3, 25))
        wait_for(lambda: last_step(read_log(run_dir(cfg))) >= target or not job.alive(), 600, f"step {target}")
        assert job.alive()
        kill_pid(rng.choice(train_workers()).pid)
        wait_for(lambda: sum(1 for r in read_log(run_dir(cfg)) if r.get("event") == "resume") > kill
                 or not job.alive(), 300, "the resume")
    result = job.join(900, "the faulty run")
    ref = fit(train_config(tmp_path / "reference", "soak", **over), prepared)
    assert result.error is None and result.metrics["step"] == SOAK_STEPS
    assert len([r for r in read_log(run_dir(cfg)) if r.get("event") == "resume"]) == 4
    a, b = hf_weights(result.checkpoint.path), hf_weights(ref.checkpoint.path)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)


def test_soak_replica_kills_every_30s_under_load(serve_up, tiny_checkpoint, key_file):
    from ray import serve

    app = "soak"
    url = deploy(serve_config(key_file, app, "serve.autoscaling.min_replicas=2", "serve.autoscaling.max_replicas=2",
                              "serve.max_ongoing_requests=8", "serve.max_queued_requests=64"), tiny_checkpoint)
    stop, statuses = threading.Event(), []

    def loop():
        with httpx.Client() as client:
            while not stop.is_set():
                statuses.append(complete(client, url, max_tokens=8, retries_on_503=3)[0])

    with cf.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(loop) for _ in range(6)]
        for _ in range(3):
            time.sleep(15)
            victim = replica_actors(app)[0]
            kill_pid(victim.pid)
            wait_for(lambda: running_replicas(app) == 2 and len(replica_actors(app)) == 2
                     and victim.actor_id not in {a.actor_id for a in replica_actors(app)}, 120, "recovery", 1)
            time.sleep(15)
        stop.set()
        for f in futures:
            f.result(timeout=60)
    failed = [s for s in statuses if s != 200]
    print(f"soak: {len(statuses)} requests, {len(failed)} failed ({len(failed) / len(statuses):.2%})")
    assert len(failed) / len(statuses) < 0.01 and healthy(url) and completes(url)
    serve.delete(app)


@settings(max_examples=1000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(body=request_bodies(CompletionRequest))
def test_soak_fuzz_completions(basic_app, body):
    with httpx.Client(timeout=60) as http:
        check(post(http, basic_app, "/v1/completions", encode(body)))
