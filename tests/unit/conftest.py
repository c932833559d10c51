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
