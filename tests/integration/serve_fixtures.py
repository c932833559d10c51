"""Shared pieces of the Serve integration tests: a tiny checkpoint, API keys in a file, and
deploying an app on the session's Ray cluster with config overrides.

Every Serve test module uses the same port (Serve fixes HTTP options once per cluster) and
shuts Serve down when it ends, so other modules sharing the Ray cluster start clean.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from raylm.config import RaylmConfig, load_config

PORT = 8123
KEYS = ("sk-test-alpha", "sk-test-beta")
MODEL_ID = "tiny-test"
# The serving and eval engines of the fixture apps start without torch.compile: each vLLM CPU
# engine start traces and compiles the model (10-20 s of the 2 cores, warm cache or not), and the
# suite starts ~20 of them to test routing, keys, rollouts and faults, not compiled kernels. The
# compiled default is what tests/integration/test_hub_models.py and the pipeline in test_s3_runs.py
# serve.
EAGER = ("serve.engine_kwargs={enforce_eager: true}", "eval.engine_kwargs={enforce_eager: true}")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("serve") / "ckpt"))


@pytest.fixture(scope="session")
def tiny_adapter(tiny_checkpoint, tmp_path_factory) -> str:
    """A peft LoRA adapter on the tiny checkpoint, its B matrices random (peft starts them at 0,
    which would make the adapter's outputs equal the base model's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_checkpoint),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text("# test keys\n" + "\n".join(KEYS) + "\n")
    return str(path)


def serve_config(key_file: str, *overrides: str) -> RaylmConfig:
    """A config for tests: 127.0.0.1:PORT, keys from a file (the env var is left alone), a small
    KV cache (the default 1 GiB per replica is more than a test needs), and engines without
    torch.compile (EAGER)."""
    return load_config(None, [
        f"serve.port={PORT}", "serve.host=127.0.0.1", f"serve.api_key_file={key_file}",
        "serve.api_key_env=RAYLM_TEST_NO_SUCH_VAR", f"serve.model_id={MODEL_ID}",
        "serve.kv_cache_memory_gib=0.25", "serve.max_tokens_limit=64", *EAGER, *overrides])


def deploy_app(cfg: RaylmConfig, checkpoint: str) -> str:
    from raylm.serve.app import deploy

    return deploy(cfg, checkpoint)[0]


def drop_edge_replicas() -> None:
    """Kill every app's edge replicas, ahead of deleting the apps. Deleted, an edge replica behind
    Serve's HAProxy stays reachable for a deregistration window before it exits
    (RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S: 30 s by Ray's default, 5 s on the suite's
    cluster, which raylm starts); a module's teardown has no traffic to protect (33 s -> 4 s per
    teardown with Ray's window). Rollouts under load keep the drain: test_lifecycle checks them."""
    import ray
    from ray.util.state import list_actors

    from raylm.serve.options import EDGE_DEPLOYMENT

    address = "http://" + ray._private.worker._global_node.webui_url  # this session's (others may run)
    for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000):
        if a.class_name.startswith("ServeReplica:") and a.class_name.endswith(f":{EDGE_DEPLOYMENT}"):
            ray.kill(ray.get_actor(a.name, namespace=a.ray_namespace))


def shutdown_serve(timeout_s: float = 120) -> None:
    """serve.shutdown() without the edge's drain window (drop_edge_replicas), then wait for Serve's
    controller to be gone: serve.shutdown can return while the controller is still stopping
    replicas, and the next module's deploy would connect to that controller just before it exits."""
    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    drop_edge_replicas()
    serve.shutdown()

    def gone() -> bool:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:
            return True
        return False

    assert wait_until(gone, timeout_s), f"Serve's controller still alive {timeout_s} s after serve.shutdown()"


def auth(key: str = KEYS[0]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def running_replicas(app: str) -> int:
    """RUNNING replicas of the app's deployment, from `serve.status()`."""
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT  # the LLM replicas (the edge's are not counted)

    model = status.deployments.get(SERVE_MODEL_DEPLOYMENT)
    return model.replica_states.get("RUNNING", 0) if model else 0


def wait_until(predicate, timeout_s: float, interval_s: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def upload_dir(client, local: str | Path, bucket: str, prefix: str) -> None:
    """Copy a local folder under s3://bucket/prefix/ (client: boto3, from the s3_server fixture)."""
    for path in Path(local).rglob("*"):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local).as_posix()}")


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]
