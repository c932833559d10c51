"""Unit tests never start Ray: any ray.init here is a bug in the code under test.

The suite's integration modules may leave this process connected to their cluster; a unit test must
still see Ray as not started, or the code under test joins that cluster instead of refusing."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.fixture(scope="session")
def single_rank(tmp_path_factory):
    """One gloo rank, as DeepSpeed finds it under Ray Train (RANK, LOCAL_RANK, WORLD_SIZE set); one
    for the session: DeepSpeed keeps the first process group it saw, so a second one breaks it."""
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as mp:  # the variables are put back when the session ends
        for k in ("RANK", "LOCAL_RANK"):
            mp.setenv(k, "0")
        for k in ("WORLD_SIZE", "LOCAL_SIZE"):
            mp.setenv(k, "1")
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}",
                                    rank=0, world_size=1)
        yield
        dist.destroy_process_group()
