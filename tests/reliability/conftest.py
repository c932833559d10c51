"""Reliability suite: faults, load and hostile input against a real local Ray (token auth on).

One Ray cluster for the whole suite (4 logical CPUs on a 2-core machine, as the integration
tests use), and one prepared corpus (tinyshakespeare, 512-token BPE, 64-token blocks) shared by
the training, tune and bad-file tests. Every wait in this suite is bounded by a timeout.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from raylm.cluster import init_ray
from raylm.config import load_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    init_ray(load_config(), num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def prepared(ray_cluster, shakespeare, cache_dir):
    """tinyshakespeare, prepared once for the suite (vocab 512, seq_len 64)."""
    from raylm.data import prepare_data

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={shakespeare}", f"data.cache_dir={cache_dir}",
                                                       "data.vocab_size=512", "data.seq_len=64"])
    return prepare_data(cfg.data, verbose=False)


# ------------------------------------------------------------------ a finished fault-free run

@pytest.fixture(scope="session")
def reference_run(prepared, tmp_path_factory):
    """A fault-free run, trained once per session. RAYLM_API_KEYS holds a canary while it runs
    (raylm forwards that variable to its workers), so test_security can look for it on disk."""
    from reliability_helpers import CANARY_KEY, REFERENCE_STEPS, fit, reference_overrides, train_config

    cfg = train_config(tmp_path_factory.mktemp("reference"), "reference", **reference_overrides())
    old = os.environ.get("RAYLM_API_KEYS")
    os.environ["RAYLM_API_KEYS"] = CANARY_KEY
    try:
        result = fit(cfg, prepared)
    finally:
        if old is None:
            os.environ.pop("RAYLM_API_KEYS", None)
        else:
            os.environ["RAYLM_API_KEYS"] = old
    assert result.error is None and result.metrics["step"] == REFERENCE_STEPS
    return cfg, result


# ------------------------------------------------------------------ serving


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("serve") / "ckpt"))


@pytest.fixture(scope="session")
def key_file(tmp_path_factory) -> str:
    from reliability_helpers import KEYS

    path = tmp_path_factory.mktemp("keys") / "api_keys"
    path.write_text("# reliability test keys\n" + "\n".join(KEYS) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def serve_up(ray_cluster):
    """Serve on 127.0.0.1:8223 for the suite; shut down (all apps) when the session ends."""
    from ray import serve

    from reliability_helpers import PORT, drop_edge_replicas

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    yield
    for app in serve.status().applications:
        drop_edge_replicas(app)
    serve.shutdown()


@pytest.fixture(scope="session")
def basic_app(serve_up, tiny_checkpoint, key_file) -> str:
    """One replica of the tiny model at /basic, shared by the hostile-input and security tests."""
    from reliability_helpers import deploy, serve_config

    cfg = serve_config(key_file, "basic", "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                       "serve.max_ongoing_requests=16")
    return deploy(cfg, tiny_checkpoint)
