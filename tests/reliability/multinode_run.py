"""Lose a whole Ray node in the middle of a raylm run, on a real multi-node cluster on this machine.

    python tests/reliability/multinode_run.py train|tune --storage DIR --out RESULT.json

Starts `ray.cluster_utils.Cluster`: a head (3 CPUs) and two worker nodes (1 CPU each), every
node a separate set of Ray processes (raylet, object store, agents; the head also GCS and the
dashboard) with its own CPUs and a node label `raylm.io/node` = head | worker-a | worker-b. raylm
connects with `init_ray(cfg, address=...)` and runs `run_training` (configs/tiny.yaml) or
`run_sweep` (tune_configs/tiny_sweep.yaml) in a thread, its 2 workers placed with
`train.placement_strategy=SPREAD` (on two different nodes) and every node writing to the same
storage folder (all nodes share this machine's disk, like a shared volume).

Once the run (train) or the first trial (tune) has a complete checkpoint and has logged a few
more steps, the worker node that hosts one of its training workers (`RayTrainWorker` actors) is
lost: every process of it is SIGKILLed at once (raylet, object store, agents and the workers the
raylet started), then `Cluster.remove_node(allow_graceful=False)`, as when its machine dies. The
node hosting the run's `TrainController` (the driver's node in train mode, the trial actor's node
in tune mode) is never the victim: losing it is losing the driver.

Recovery is Ray Train's own failure handling, fixed-size (not elastic), on the nodes that are
left; the node does not come back. The controller sees a dead worker, tears the group down and
starts a new group of the same size (`train.max_failures` restarts allowed). Every worker of the
new group runs raylm's resume: the newest complete `step_*` checkpoint in storage, verified
against its manifest, at the data position it had reached. A sweep goes on with its trials.

Why the head has 3 CPUs: what is left after the loss must hold the new group (2 workers of 1 CPU;
in a sweep 0.995 each plus the trial function's 0.01) *and* leave one whole CPU free on some node.
The Ray Data blocks that lived on the lost node (Ray Data runs its split tasks SPREAD over the
nodes, so some of the workers' pre-cut shards are there) are rebuilt from lineage by re-running a
task that asks for 1 CPU, and the new workers wait for them. With a 2-CPU head a sweep deadlocks:
3 CPUs left, 2 taken, but the free CPU is split 0.995 + 0.005 over two nodes and the rebuild task
(`_split_single_block`) stays PENDING_NODE_ASSIGNMENT for ever. Plain training (no 0.01 sliver)
recovers with a 2-CPU head, and would hang with a 1-CPU one.

The result JSON records the nodes, where the workers were before the kill and after the
restart, the killed node, the last step logged and the complete checkpoints at the kill, the
run's metrics.jsonl records (resume events included), the final metrics (train) or the trials
table and best.json (tune), and the wall time. tests/reliability/test_multinode.py asserts on it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from reliability_helpers import wait_for  # this script's folder is on sys.path when it runs

from raylm.cluster import listen_port

ROOT = Path(__file__).resolve().parents[2]
LABEL = "raylm.io/node"
HEAD_CPUS, WORKER_NODE_CPUS = 3, 1


# ------------------------------------------------------------------ run folder


def read_log(run: str) -> list[dict]:
    """metrics.jsonl of a run folder; a line cut by a kill is skipped."""
    out = []
    try:
        with open(os.path.join(run, "metrics.jsonl")) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    except FileNotFoundError:
        pass
    return out


def last_step(log: list[dict]) -> int:
    return max((r["step"] for r in log if "loss" in r), default=0)


def complete_checkpoints(run: str) -> list[int]:
    """Steps of the run's checkpoints that verify against their manifest (raylm's own check)."""
    from raylm.train.checkpoint import CheckpointError, verify_checkpoint

    steps = []
    for path in sorted(glob.glob(os.path.join(run, "step_*"))):
        try:
            steps.append(int(verify_checkpoint(path)["step"]))
        except (CheckpointError, OSError, ValueError):
            pass
    return steps


# ------------------------------------------------------------------ the cluster


def start_cluster() -> tuple[Any, dict]:
    """Head + worker-a + worker-b; returns (cluster, {label: Node})."""
    from ray.cluster_utils import Cluster

    # The state API (list_actors) and Ray Train's placement-group cleaner reach the dashboard by
    # this address; naming it avoids auto-detection, which fails with another Ray on the machine.
    port = listen_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": HEAD_CPUS, "labels": {LABEL: "head"}, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": port, "dashboard_agent_listen_port": listen_port()})
    nodes = {"head": cluster.head_node}
    for name in ("worker-a", "worker-b"):
        nodes[name] = cluster.add_node(num_cpus=WORKER_NODE_CPUS, labels={LABEL: name})
    cluster.wait_for_nodes()
    return cluster, nodes


def kill_node(cluster: Any, node: Any) -> int:
    """Lose a whole node at once, as when its machine dies: SIGKILL every process of it in one
    sweep (raylet, object store, agents and every worker the raylet started), then
    let the Cluster forget it. `remove_node` alone kills only the node's own daemons; its workers
    notice their raylet is gone seconds later and keep computing (and checkpointing) meanwhile,
    which is not what a lost machine does. Returns how many processes were killed."""
    import psutil

    procs: list = []
    for infos in node.all_processes.values():
        for info in infos:
            try:
                proc = psutil.Process(info.process.pid)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    cluster.remove_node(node, allow_graceful=False)
    return len(procs)


def actors_on_nodes(class_name: str, node_names: dict[str, str]) -> list[str]:
    """Node label of every live actor of that class (one entry per actor)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return sorted(node_names.get(a.node_id, a.node_id) for a in actors)


# ------------------------------------------------------------------ the job


class Job(threading.Thread):
    def __init__(self, fn: Callable[[], Any]):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None

    def run(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as exc:  # noqa: BLE001 - reported in the result
            self.error = "".join(traceback.format_exception(exc))


def load(mode: str, storage: str, cache_dir: str, max_steps: int, ckpt_every: int, samples: int):
    from raylm.config import load_config

    base = ROOT / ("configs/tiny.yaml" if mode == "train" else "tune_configs/tiny_sweep.yaml")
    over = {
        "train.storage_path": storage, "data.cache_dir": cache_dir,
        "train.placement_strategy": "SPREAD", "train.max_failures": 3,
        "train.max_steps": max_steps, "train.checkpoint_every_steps": ckpt_every,
        "train.eval_every_steps": 2 * ckpt_every, "train.log_every_steps": 1,
        # every checkpoint stays, so the test can verify the one the run resumed from
        "train.keep_checkpoints": max_steps // ckpt_every + 1,
        "train.run_name": "multinode",
    }
    if mode == "tune":
        over.update({"tune.num_samples": samples, "tune.sweep_name": "multinode-sweep"})
    return load_config(base, [f"{k}={v}" for k, v in over.items()])


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("train", "tune"))
    p.add_argument("--storage", required=True, help="storage root shared by every node")
    p.add_argument("--out", required=True, help="where the JSON result goes")
    p.add_argument("--cache-dir", default=None, help="data.cache_dir (default: <storage>/cache)")
    p.add_argument("--max-steps", type=int, default=None, help="default: 60 (train), 40 (tune)")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--kill-after", type=int, default=4, help="steps logged past the first checkpoint before the kill")
    p.add_argument("--samples", type=int, default=3, help="tune: trials in the sweep")
    p.add_argument("--timeout", type=float, default=540, help="seconds for the whole run")
    args = p.parse_args(argv)

    t0 = time.monotonic()
    # `timeout` sends SIGTERM: unwind through `finally`, so the cluster is shut down and its
    # address file (/tmp/ray/ray_current_cluster) removed rather than left to the next Ray
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    storage = os.path.abspath(args.storage)
    max_steps = args.max_steps or (60 if args.mode == "train" else 40)
    cfg = load(args.mode, storage, args.cache_dir or os.path.join(storage, "cache"), max_steps,
               args.checkpoint_every, args.samples)
    result: dict[str, Any] = {"mode": args.mode, "storage": storage, "max_steps": max_steps,
                              "checkpoint_every": args.checkpoint_every, "head_cpus": HEAD_CPUS,
                              "worker_node_cpus": WORKER_NODE_CPUS, "recovery": "fixed-size restart on the nodes left"}

    from raylm.cluster import init_ray, worker_env

    os.environ.update({k: v for k, v in worker_env(False).items() if k not in os.environ})  # node processes inherit it
    cluster, nodes = start_cluster()
    try:
        init_ray(cfg, address=cluster.address)
        node_names = {n.node_id: name for name, n in nodes.items()}
        result["nodes"] = {name: n.node_id for name, n in nodes.items()}
        result["cluster_cpus"] = __import__("ray").cluster_resources().get("CPU")

        if args.mode == "train":
            from raylm.train.driver import run_training

            job = Job(lambda: run_training(cfg))
            run_of = lambda: os.path.join(storage, cfg.train.run_name)  # noqa: E731
        else:
            from raylm.tune import run_sweep, sweep_path

            job = Job(lambda: run_sweep(cfg))
            trials = os.path.join(sweep_path(cfg), "trials")

            def run_of() -> Optional[str]:  # the first trial that trains (one trial runs at a time)
                found = sorted(glob.glob(os.path.join(trials, "*", "metrics.jsonl")), key=os.path.getmtime)
                return os.path.dirname(found[0]) if found else None
        job.start()

        def alive() -> None:
            if not job.is_alive():
                raise RuntimeError(f"the run ended before the kill:\n{job.error}")

        # ---- once training runs: where its workers are, and the victim (chosen now, so that the
        # kill itself is a file check away from the step it aims at: a step takes ~70 ms here)
        def training() -> Optional[tuple[str, list[str], list[str]]]:
            alive()
            run = run_of()
            if not run or last_step(read_log(run)) < 1:
                return None
            workers = actors_on_nodes("RayTrainWorker", node_names)
            controllers = actors_on_nodes("TrainController", node_names)
            return (run, workers, controllers) if len(workers) == cfg.train.num_workers and controllers else None

        run, workers, controllers = wait_for(training, args.timeout / 2, "the training workers", 0.05)
        victims = [n for n in ("worker-a", "worker-b") if n in workers and n not in controllers]
        if not victims:
            raise RuntimeError(f"no worker node to kill: workers on {workers}, controllers on {controllers}")
        victim = victims[0]
        result.update({"run_dir": run, "workers_before_kill": workers, "controllers": controllers,
                       "killed_node": victim})

        # ---- a complete checkpoint and a few more steps, then the whole node goes
        def ready() -> bool:
            alive()
            done = complete_checkpoints(run)
            return bool(done) and last_step(read_log(run)) >= done[0] + args.kill_after

        wait_for(ready, args.timeout / 2, "the first checkpoint", 0.02)
        result["checkpoints_at_kill"] = complete_checkpoints(run)
        result["step_at_kill"] = last_step(read_log(run))
        t_kill = time.monotonic()
        result["killed_processes"] = kill_node(cluster, nodes[victim])
        result["kill_time_s"] = round(t_kill - t0, 1)
        result["step_logged_after_kill"] = last_step(read_log(run))
        print(f"multinode: killed {victim} (workers were on {workers}) at step {result['step_at_kill']}, "
              f"complete checkpoints {result['checkpoints_at_kill']}", flush=True)

        # ---- the restarted group: what it resumed from, where it runs, how long it took
        def resumed() -> bool:
            return not job.is_alive() or any(r.get("event") == "resume" for r in read_log(run))

        wait_for(resumed, args.timeout / 2, "the resume", 0.02)
        result["checkpoints_at_resume"] = complete_checkpoints(run)
        result["resume_after_s"] = round(time.monotonic() - t_kill, 1)
        result["workers_after_resume"] = actors_on_nodes("RayTrainWorker", node_names)

        job.join(max(1.0, args.timeout - (time.monotonic() - t0)))
        if job.is_alive():
            raise TimeoutError(f"the run did not finish within {args.timeout}s")
        result["error"] = job.error
        result["log"] = read_log(run)
        result["checkpoints_after"] = complete_checkpoints(run)
        if args.mode == "train" and job.value is not None:
            out = job.value
            result.update({"final_metrics": out.metrics, "checkpoint": out.checkpoint})
        if args.mode == "tune" and job.value is not None:
            outcome = job.value
            result["killed_trial"] = os.path.basename(run)
            result["trials"] = [{"trial_id": r.trial_id, "status": r.status, "steps": r.steps, "error": r.error,
                                 "log": read_log(os.path.join(trials, r.trial_id))} for r in outcome.trials]
            result["best_json"] = outcome.best_json
            result["best_trial"] = outcome.best.trial_id if outcome.best else None
    except BaseException as exc:  # noqa: BLE001 - the result says what went wrong
        result["error"] = (result.get("error") or "") + "".join(traceback.format_exception(exc))
    finally:
        result["wall_s"] = round(time.monotonic() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        try:
            import ray

            ray.shutdown()
            cluster.shutdown()
        except Exception:  # noqa: BLE001
            traceback.print_exc()
    print(json.dumps({k: v for k, v in result.items() if k not in ("log", "trials")}, indent=1, default=str),
          flush=True)
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    sys.exit(main())
