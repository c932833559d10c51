"""Helpers shared by the reliability tests (a uniquely named module: tests/integration has its own)."""

from __future__ import annotations

import glob
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from raylm.config import RaylmConfig, load_config

ROOT = Path(__file__).resolve().parents[2]

# the fault-free reference run (conftest.reference_run) that the fault tests compare against
CANARY_KEY = "sk-canary-7f3c9a51e2d84b06"  # must never appear in a checkpoint or a log
REFERENCE_STEPS, CKPT_EVERY = 40, 10


def reference_overrides() -> dict:
    """The run the fault tests compare against: 40 steps, a checkpoint every 10, all kept."""
    return {"train.max_steps": REFERENCE_STEPS, "train.checkpoint_every_steps": CKPT_EVERY,
            "train.eval_every_steps": 20, "train.keep_checkpoints": 10, "train.max_failures": 2}


# Serve fixes its HTTP host/port once per Ray cluster; 8123 (integration) and 8311/8312 (bench)
# are used by other runs on this machine.
PORT = 8223
KEYS = ("sk-rel-alpha-4d1f0c", "sk-rel-beta-9e27b3")
MODEL_ID = "tiny-rel"


# ------------------------------------------------------------------ waiting


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# ------------------------------------------------------------------ training


def train_config(storage: Path | str, run_name: str, **fields) -> RaylmConfig:
    """configs/tiny.yaml with 64-token blocks and a 512 vocab (the suite's prepared data)."""
    over = {"data.vocab_size": 512, "data.seq_len": 64, "train.storage_path": str(storage),
            "train.run_name": run_name, "train.log_every_steps": 1, "train.warmup_steps": 5, **fields}
    return load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def run_dir(cfg: RaylmConfig) -> Path:
    return Path(cfg.train.storage_path) / cfg.train.run_name


def read_log(path: Path | str) -> list[dict]:
    """metrics.jsonl of a run folder (or the file itself); a line cut by a kill is ignored."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def complete_steps(run: str | os.PathLike) -> list[int]:
    """Steps of the run's checkpoints that verify against their manifest (what a resume may use)."""
    from raylm.train.checkpoint import verified_checkpoints

    return sorted(m["step"] for _, m in verified_checkpoints(str(run), log=lambda _: None))


def last_step(log: list[dict]) -> int:
    return max((r["step"] for r in log if "loss" in r), default=0)


def fit(cfg: RaylmConfig, prepared: Any) -> Any:
    from raylm.train.driver import build_trainer, check_data_fits

    check_data_fits(cfg, prepared)
    return build_trainer(cfg, prepared).fit()


class Background:
    """Run a callable in a daemon thread; `join` returns its value or re-raises its error."""

    def __init__(self, fn: Callable[[], Any]):
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn):
        try:
            self.outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.outcome["error"] = exc

    def alive(self) -> bool:
        return self.thread.is_alive()

    def join(self, timeout_s: float, what: str) -> Any:
        self.thread.join(timeout=timeout_s)
        assert not self.thread.is_alive(), f"{what} did not finish within {timeout_s}s"
        if "error" in self.outcome:
            raise self.outcome["error"]
        return self.outcome["value"]


def dashboard_url() -> str:
    """This session's dashboard (other Ray clusters may run on the same machine)."""
    import ray

    return "http://" + ray._private.worker._global_node.webui_url


def list_actors(**kwargs) -> list:
    from ray.util.state import list_actors as _list_actors

    return _list_actors(address=dashboard_url(), **kwargs)


def train_workers() -> list:
    return sorted(list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]),
                  key=lambda a: a.actor_id)


def kill_pid(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def hf_weights(checkpoint: str | Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(checkpoint) / "hf" / "model.safetensors"))


def ds_weights(checkpoint: str | Path) -> dict:
    """The fp32 weights of any checkpoint, exported or not (train.export: final_and_best leaves the
    periodic ones without hf/): DeepSpeed's merge of the ranks' ZeRO shards."""
    import json

    from raylm.train.export import fp32_state_dict

    manifest = json.loads((Path(checkpoint) / "raylm_checkpoint.json").read_text())
    return fp32_state_dict(str(Path(checkpoint) / "deepspeed"), manifest["zero_stage"], adapter_only=False)


def session_logs_dir() -> str:
    import ray

    return ray._private.worker._global_node.get_logs_dir_path()


def worker_logs_containing(text: str, since: float = 0.0) -> list[str]:
    """Lines of this cluster's worker stdout/stderr logs (written after `since`) containing `text`."""
    hits = []
    for path in glob.glob(os.path.join(session_logs_dir(), "worker-*")):
        try:
            if os.path.getmtime(path) < since:
                continue
            with open(path, errors="replace") as f:
                hits += [line.rstrip("\n") for line in f if text in line]
        except OSError:
            continue
    return hits


# ------------------------------------------------------------------ serving


def serve_overrides(key_file: str, app: str, *overrides: str) -> list[str]:
    """`--set` overrides for a test app at /<app> on PORT with keys from a file and a small KV cache."""
    return [f"serve.port={PORT}", "serve.host=127.0.0.1", f"serve.api_key_file={key_file}",
            "serve.api_key_env=RAYLM_REL_NO_SUCH_VAR", f"serve.model_id={MODEL_ID}", f"serve.app_name={app}",
            f"serve.route_prefix=/{app}", "serve.kv_cache_memory_gib=0.25", "serve.max_tokens_limit=64",
            "serve.engine_kwargs={enforce_eager: true}", *overrides]  # no torch.compile (serve_fixtures.EAGER)


def serve_config(key_file: str, app: str, *overrides: str) -> RaylmConfig:
    return load_config(None, serve_overrides(key_file, app, *overrides))


def deploy(cfg: RaylmConfig, checkpoint: str) -> str:
    from raylm.serve.app import deploy as serve_deploy

    return serve_deploy(cfg, checkpoint)[0]


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def drop_edge_replicas(app: str) -> None:
    """Kill the app's edge replicas ahead of deleting it: deleted, an edge replica behind Serve's
    HAProxy stays reachable for a deregistration window first (5 s on a cluster raylm starts, Ray's
    default 30 s), which a teardown does not need."""
    import ray

    from raylm.serve.options import EDGE_DEPLOYMENT

    for a in list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{EDGE_DEPLOYMENT}"), ("state", "=", "ALIVE")]):
        ray.kill(ray.get_actor(a.name, namespace=a.ray_namespace))


def replica_actors(app: str, state: str = "ALIVE") -> list:
    return [a for a in list_actors(filters=[("state", "=", state)], limit=1000)
            if a.class_name == f"ServeReplica:{app}:LLMServer"]


def running_replicas(app: str) -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT  # the LLM replicas (the edge's are not counted)

    model = status.deployments.get(SERVE_MODEL_DEPLOYMENT)
    return model.replica_states.get("RUNNING", 0) if model else 0


def proc_rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def completes(url: str, max_tokens: int = 2) -> bool:
    import httpx

    resp = httpx.post(f"{url}/v1/completions", headers=auth(), timeout=60,
                      json={"model": MODEL_ID, "prompt": "hello", "max_tokens": max_tokens, "temperature": 0})
    return resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1
