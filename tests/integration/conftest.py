"""One real local Ray cluster for the whole integration run (token auth on, as Ray 2.60 sets it)."""

import pytest
from grpo_fixtures import grpo_run  # noqa: F401 - one GRPO run for the session (test_grpo_train, test_lifecycle)

from raylm.cluster import init_ray
from raylm.config import load_config


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # 4 logical CPUs on a 2-core machine: Ray Data tasks, 2 Train workers and a Serve replica
    # can be placed together; the tests measure behaviour, not speed.
    init_ray(load_config(), num_cpus=4)
    yield ray
    ray.shutdown()
