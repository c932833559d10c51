"""Connecting to Ray: one place decides the address, the runtime env and token authentication."""

from __future__ import annotations

import logging
import os
from typing import Optional

from raylm.config import RaylmConfig

# Environment every raylm Ray process gets: DeepSpeed's CPU accelerator when there is no GPU,
# quiet tokenizers (they fork inside Ray workers), and no network lookups for HF hub files.
# Never a secret: Ray writes runtime_env env_vars into its logs (runtime_env_agent.log), so API
# keys stay out (replicas get only key hashes; see serve/auth.py). tests/reliability checks this.
def worker_env(use_gpu: bool) -> dict[str, str]:
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


def init_ray(cfg: RaylmConfig, address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to (or start) Ray with token authentication kept on.

    Order: explicit address, `cluster.address`, `RAY_ADDRESS` (set by `ray job submit`), else a
    new local cluster. Ray 2.60 turns token auth on for new local clusters; we set it explicitly
    an inherited `RAY_AUTH_MODE=disabled` is refused rather than silently honoured. (We do not
    set `RAY_AUTH_MODE=token` ourselves: with the variable set, Ray 2.60 expects a token to
    exist already, while with it unset a new local cluster generates ~/.ray/auth_token.)
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" and not os.environ.get("RAYLM_ALLOW_NO_AUTH"):
        raise RuntimeError("RAY_AUTH_MODE=disabled: raylm keeps Ray token authentication on "
                           "(set RAYLM_ALLOW_NO_AUTH=1 to override for a cluster you secure otherwise)")
    os.environ.update({k: v for k, v in worker_env(cfg.train.use_gpu).items() if k not in os.environ})
    target = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    from raylm import console

    kwargs: dict = {"namespace": cfg.cluster.namespace, "log_to_driver": console.forward_worker_logs(),
                    "runtime_env": {"env_vars": worker_env(cfg.train.use_gpu)}}
    if console.quiet():
        kwargs["logging_level"] = logging.ERROR
    if target:
        ray.init(address=target, **kwargs)
        console.silence()
        return
    # The dashboard (bound to 127.0.0.1, behind the token) serves the state API that Ray Train V2
    # uses: its PlacementGroupCleaner asks it whether a controller died, to free the workers'
    # placement group. Ray processes find it by auto-detection, which fails as soon as a second
    # Ray runs on the machine ("multiple active Ray instances"); a stopped Tune trial then keeps
    # its CPUs forever. So the port is chosen here and named to every process of this cluster.
    port = _free_port()
    api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    if cfg.serve.direct_ingress:  # read once by the Serve controller and replicas this cluster starts
        os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
    os.environ.update(api)  # inherited by the raylet and every worker it starts
    kwargs["runtime_env"]["env_vars"].update(api)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    console.silence()


def _free_port(preferred: int = 8265) -> int:
    """Ray's usual dashboard port when it is free, else any free port."""
    import socket

    for candidate in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free TCP port for the Ray dashboard")
