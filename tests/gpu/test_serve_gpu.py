"""The serve stage on CUDA: the vLLM engine on a GPU replica (bf16, one GPU from the replica's
placement group), completions through the HTTP endpoint, seeded sampling reproducible and
continuous batching of concurrent requests. Skipped without a GPU (and without the `gpu` extra:
`pip install -e .[gpu]` installs vllm)."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]

PORT, KEY, MODEL = 8140, "sk-gpu-test", "tiny-gpu"


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    import ray

    from raylm.cluster import init_ray
    from raylm.config import load_config
    from raylm.serve.app import deploy
    from raylm.serve.tiny import make_tiny_checkpoint

    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text(KEY + "\n")
    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu") / "tiny"))
    cfg = load_config(None, ["serve.use_gpu=true", f"serve.port={PORT}", f"serve.api_key_file={keys}",
                             "serve.api_key_env=RAYLM_TEST_NO_SUCH_VAR", f"serve.model_id={MODEL}",
                             "serve.gpu_memory_utilization=0.3", "serve.max_tokens_limit=128"])
    init_ray(cfg)
    yield deploy(cfg, ckpt)[0]
    ray.shutdown()


def complete(url: str, **body) -> dict:
    resp = httpx.post(f"{url}/v1/completions", json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_gpu_replica_generates_and_seeds_reproduce(url):
    out = complete(url, prompt="Hello", max_tokens=16, temperature=0, ignore_eos=True)
    assert out["usage"]["completion_tokens"] == 16
    a = complete(url, prompt="Once", max_tokens=16, temperature=1.0, seed=11)["choices"][0]["text"]
    assert complete(url, prompt="Once", max_tokens=16, temperature=1.0, seed=11)["choices"][0]["text"] == a


def test_concurrent_requests_all_complete(url):
    with cf.ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda i: complete(url, prompt=f"req {i}", max_tokens=32, ignore_eos=True), range(32)))
    assert all(o["usage"]["completion_tokens"] == 32 for o in outs)
