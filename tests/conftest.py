"""Shared test settings: no network, caches in a per-run temp folder, corpus from ../shared."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHAKESPEARE = SHARED / "corpora" / "tinyshakespeare.txt"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The session's own Hugging Face cache, set before anything imports huggingface_hub (it reads the
# path once) or starts Ray (its workers inherit it): the Hub stand-ins (fixture hub_standins) go
# there, never into a developer's cache, and every Ray worker resolves them by id.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="raylm-test-hf-home-")
atexit.register(shutil.rmtree, os.environ["HF_HOME"], True)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Each test (and each `raylm` subprocess it starts) gets the cluster it asks for; test_lifecycle
# checks that a command joins the running one.
os.environ.setdefault("RAYLM_JOIN_RUNNING_RAY", "0")
# Ray Train's controller polls its workers every 2 s, and each phase of a run (group started,
# training finished, shut down) waits for a poll: 0.5 s takes ~3 s off every fit and sweep trial
# of the suite (a 2-step fit: 21.6 -> 18.2 s here). The suite's cluster, Tune trials and `raylm`
# subprocesses all inherit it; Ray propagates it to the controller (get_env_vars_to_propagate).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray exports every process's metrics (vLLM's engine counters, raylm's request counters) to the
# Prometheus endpoint every 10 s by default; the tests that read a counter wait for an export,
# and the ones that check a counter stayed put wait out two. 2 s for the suite's clusters.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
# Serve's replicas (the edge's access log, one line a request) write their logs to files under the
# session's log folder; their copy on stderr reached pytest's output through Ray's log_to_driver.
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")


def _has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def pytest_collection_modifyitems(config, items):
    gpu = _has_gpu()
    soak = os.environ.get("RAYLM_SOAK") == "1"
    multinode = os.environ.get("RAYLM_MULTINODE") == "1"
    extended = os.environ.get("RAYLM_EXTENDED") == "1"
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "slow" in item.keywords and not soak:
            item.add_marker(pytest.mark.skip(reason="soak test: set RAYLM_SOAK=1"))
        if "multinode" in item.keywords and not multinode:
            item.add_marker(pytest.mark.skip(reason="multi-node test: set RAYLM_MULTINODE=1"))
        if "extended" in item.keywords and not extended:
            item.add_marker(pytest.mark.skip(reason="a second variant of a checked invariant: set RAYLM_EXTENDED=1"))


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    if not SHAKESPEARE.is_file():
        pytest.fail(f"{SHAKESPEARE} missing: the tests read the shared corpus from ../shared")
    return SHAKESPEARE


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("raylm-cache"))


# ------------------------------------------------------------------ object storage


S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback: moto in server mode with request signatures checked (an IAM user
    and its access key are made first; a wrong secret is refused like AWS refuses it), and the
    standard AWS_* environment pointing at it (for this process and the processes it starts).
    Yields (endpoint URL, boto3 client)."""
    import json
    import socket
    import subprocess
    import sys
    import time

    import boto3
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # moto answers the first 4 requests unauthenticated: the readiness GET, create_user, put_user_policy,
    # create_access_key; every later one must be signed with that key
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start")
                time.sleep(0.2)
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="raylm")
        iam.put_user_policy(UserName="raylm", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="raylm")["AccessKey"]
        os.environ.update({"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                           "AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
        yield endpoint, boto3.client("s3", endpoint_url=endpoint)
    finally:
        proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v



# ------------------------------------------------------------------ Hub stand-ins


@pytest.fixture(scope="session")
def hub_standins():
    """Tiny random models of the real architectures (Llama-3, Qwen2, Mistral, Gemma-2, Phi-3, GPT-2)
    in the session's Hugging Face hub cache (HF_HOME, above), built once: {family: "ORG/NAME"}
    (tests/hub_standins.py)."""
    from hub_standins import build_standins

    return build_standins(os.environ["HF_HOME"])
