"""Checkpoints and sweep results in object storage, against a real S3 API (moto on loopback):
`raylm serve` resolves a best.json in s3:// and each replica downloads the checkpoint it points at
once into its node's cache; a missing bucket or object and an unreachable endpoint are errors
naming the URI. (`raylm serve --checkpoint s3://...` end to end: test_serve_direct_ingress.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from serve_fixtures import tiny_checkpoint, upload_dir

from raylm import storage
from raylm.servable import CheckpointError, resolve_checkpoint

__all__ = ["tiny_checkpoint"]


@pytest.fixture(scope="module")
def sweep_in_s3(s3_server, tiny_checkpoint) -> str:
    _, client = s3_server
    client.create_bucket(Bucket="raylm-store")
    upload_dir(client, tiny_checkpoint, "raylm-store", "sweeps/s1/trials/t1/step_00000010/hf")
    client.put_object(Bucket="raylm-store", Key="sweeps/s1/best.json",
                      Body=json.dumps({"checkpoint": "trials/t1/step_00000010/hf", "val_loss": 1.0}).encode())
    return "s3://raylm-store/sweeps/s1/best.json"


def test_a_best_json_in_s3_resolves_to_its_checkpoint_and_downloads_once(sweep_in_s3, tiny_checkpoint, tmp_path):
    resolved = resolve_checkpoint(sweep_in_s3)
    assert resolved == "s3://raylm-store/sweeps/s1/trials/t1/step_00000010/hf"
    assert resolve_checkpoint(resolved) == resolved  # the directory itself
    local = storage.cached_copy(resolved, cache_dir=str(tmp_path))
    assert sorted(os.listdir(local)) == sorted(os.listdir(tiny_checkpoint))
    assert Path(local, "model.safetensors").read_bytes() == Path(tiny_checkpoint, "model.safetensors").read_bytes()
    assert storage.cached_copy(resolved, cache_dir=str(tmp_path)) == local  # cached: no second download
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []  # nothing half-written left behind


def test_a_checkpoint_written_again_under_the_same_uri_is_fetched_again(s3_server, tiny_checkpoint, tmp_path):
    _, client = s3_server
    client.create_bucket(Bucket="raylm-rewrite")
    upload_dir(client, tiny_checkpoint, "raylm-rewrite", "ckpt")
    first = storage.cached_copy("s3://raylm-rewrite/ckpt", cache_dir=str(tmp_path))
    client.put_object(Bucket="raylm-rewrite", Key="ckpt/config.json", Body=b'{"model_type": "llama", "new": 1}')
    second = storage.cached_copy("s3://raylm-rewrite/ckpt", cache_dir=str(tmp_path))
    assert second != first and json.loads(Path(second, "config.json").read_text())["new"] == 1


@pytest.mark.parametrize("uri,named", [
    ("s3://no-such-bucket/sweeps/s1/best.json", "s3://no-such-bucket/sweeps/s1/best.json"),
    ("s3://raylm-store/sweeps/nothing/best.json", "s3://raylm-store/sweeps/nothing/best.json"),
    ("s3://raylm-store/sweeps/s1", "s3://raylm-store/sweeps/s1"),  # a folder, but no checkpoint
])
def test_missing_objects_are_errors_naming_the_uri(sweep_in_s3, uri, named):
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        resolve_checkpoint(uri)


def test_an_unreachable_endpoint_is_an_error_naming_the_uri(sweep_in_s3, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(CheckpointError, match=r"s3://raylm-store/sweeps/s1/best\.json"):
        resolve_checkpoint(sweep_in_s3)
