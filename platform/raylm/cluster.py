"""Connecting to Ray: one place decides the address, the runtime env and token authentication."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from raylm.config import RaylmConfig

# Environment every raylm Ray process gets: DeepSpeed's CPU accelerator when there is no GPU,
# quiet tokenizers (they fork inside Ray workers), and no network lookups for HF hub files.
# Never a secret: Ray writes runtime_env env_vars into its logs (runtime_env_agent.log), so API
# keys stay out (replicas get only key hashes; see serve/auth.py). tests/reliability checks this.
def worker_env(use_gpu: bool) -> dict[str, str]:
    """The environment of raylm's driver and every Ray worker of its job.

    RAY_DATA_PARQUET_FOOTER_NUM_ACTORS: Ray Data 2.60 reads Parquet footers on a pool of actors, 32
    by default, started anew for every `read_parquet` (each a Python process). On a 2-core machine
    that was ~20 s of process start-up before each evaluation read its few-file validation split
    (64 -> 43 s per `raylm eval` of the tiny model). Each actor already reads 128 footers at once,
    so one per two CPUs of the driver's machine, at most Ray's 32, is kept unless the user sets it.

    RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: Ray Train's controller polls its workers at most every 2 s
    by default, so a finished (or failed) run was noticed up to 2 s late, in every run and every
    Tune trial; 0.5 s costs a status call per worker per poll. Kept if the user sets it.
    """
    env = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": os.environ.get(
               "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(min(32, max(1, (os.cpu_count() or 2) // 2)))),
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")}
    if not use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def init_ray(cfg: RaylmConfig, address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to (or start) Ray with token authentication kept on.

    Order: explicit address, `cluster.address`, `RAY_ADDRESS` (set by `ray job submit`), else a
    Ray cluster already running on this machine (the one `raylm serve` started, say: a second
    head beside it would clash on the dashboard agent's port, and commands like `raylm promote`
    must reach its Serve), else a new local cluster. `--address local` always starts a new one;
    RAYLM_JOIN_RUNNING_RAY=0 turns the joining off. An inherited `RAY_AUTH_MODE=disabled` is
    refused rather than silently honoured.

    Token auth: Ray 2.60 turns it on for a new local cluster (and sets RAY_AUTH_MODE=token in
    this process's environment, which every child inherits), but `ray.init(address=...)` with an
    explicit address never does, so a fresh shell joining by address was refused
    ("InvalidAuthToken ... RAY_AUTH_MODE is currently 'disabled'"); a subprocess of the process
    that started the cluster inherited the variable and joined. So joining takes the cluster's
    token (use_cluster_token) and a new cluster gets a private one (ensure_cluster_token).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_AUTH_MODE", "token").lower() == "disabled" and not os.environ.get("RAYLM_ALLOW_NO_AUTH"):
        raise RuntimeError("RAY_AUTH_MODE=disabled: raylm keeps Ray token authentication on "
                           "(set RAYLM_ALLOW_NO_AUTH=1 to override for a cluster you secure otherwise)")
    os.environ.update({k: v for k, v in worker_env(cfg.train.use_gpu).items() if k not in os.environ})
    target = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS") or running_cluster()
    from raylm import console

    if target and target != "local":
        use_cluster_token(target)
    else:
        ensure_cluster_token()

    kwargs: dict = {"namespace": cfg.cluster.namespace, "log_to_driver": console.forward_worker_logs(),
                    "runtime_env": {"env_vars": worker_env(cfg.train.use_gpu)}}
    if cfg.train.objective == "grpo":  # the user's reward files, importable on every worker
        from raylm.rewards import reward_modules

        modules = reward_modules(cfg.train.grpo.reward_funcs)  # an unimportable one fails here, before Ray
        if modules:
            kwargs["runtime_env"]["py_modules"] = modules
    if console.quiet():
        kwargs["logging_level"] = logging.ERROR
    if target and target != "local":
        ray.init(address=target, **kwargs)
        console.silence()
        console.say(f"Ray: joined the cluster at {target} (--address local starts a new one)", event="ray",
                    address=target, joined=True)
        return
    # The dashboard (bound to 127.0.0.1, behind the token) serves the state API that Ray Train V2
    # uses: its PlacementGroupCleaner asks it whether a controller died, to free the workers'
    # placement group. Ray processes find it by auto-detection, which fails as soon as a second
    # Ray runs on the machine ("multiple active Ray instances"); a stopped Tune trial then keeps
    # its CPUs forever. So the port is chosen here and named to every process of this cluster.
    port = _free_port()
    api = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}
    os.environ.update(serve_ingress_env(cfg.serve.ingress_mode))  # read once by this cluster's Serve
    os.environ.update(api)  # inherited by the raylet and every worker it starts
    # Ray Train 2.60 starts a PreemptionWatcher actor beside every run's controller, polling for
    # nodes being drained (spot reclaims). The cluster started here is this one machine: no node can
    # be drained from under a run without taking the run with it. One process less per run and per
    # Tune trial, and no "constructor arguments in the object store" error line in each run's log.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    kwargs["runtime_env"]["env_vars"].update(api)
    ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port, **kwargs)
    console.silence()


# ------------------------------------------------------------------ the cluster's token

TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


def token_path() -> Path:
    """Where Ray reads the cluster token from: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token").expanduser()


def secure_token_file(path: Path) -> None:
    """The token lets whoever holds it submit jobs (code execution on the cluster): a token file
    group or others can read is made 0600 (and Ray's default folder 0700), or refused when this
    user cannot change it."""
    from raylm.console import say
    from raylm.errors import InputError

    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(0o600)
        except OSError as exc:
            raise InputError(f"the Ray token {path} is readable by other users (mode {mode:o}) and cannot be made "
                             f"private ({exc.strerror}): run `chmod 600 {path}` as its owner") from None
        say(f"Ray token {path} was readable by other users (mode {mode:o}): made it 0600", event="token_fixed",
            path=str(path))
    if not os.environ.get(TOKEN_PATH_ENV) and path.parent.stat().st_mode & 0o077:
        try:
            path.parent.chmod(0o700)
        except OSError:
            pass  # the file itself is 0600: its folder's mode only hides that it exists


def ensure_cluster_token() -> None:
    """Before starting a local cluster: the token Ray will find, private from its first byte.
    Ray 2.60 writes a missing ~/.ray/auth_token with the umask's mode (-rw-r--r-- in a
    drwxr-xr-x folder), so raylm writes it first, 0600 in a 0700 folder, with Ray's generator."""
    if os.environ.get(TOKEN_ENV) or os.environ.get(AUTH_MODE_ENV, "token").lower() != "token":
        return
    path = token_path()
    if not path.exists():
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process wrote it just now: use that one
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(generate_new_authentication_token())
    secure_token_file(path)


def use_cluster_token(target: str) -> None:
    """Before joining a running cluster: token mode with the cluster's token ($RAY_AUTH_TOKEN, or
    the file at token_path()), as `ray start`/`ray.init("auto")` would set it, so a fresh shell
    with only HOME joins the cluster `raylm serve` started, and one with RAY_ADDRESS and
    RAY_AUTH_TOKEN_PATH joins a remote one."""
    from raylm.errors import InputError

    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        return  # disabled: allowed by RAYLM_ALLOW_NO_AUTH (init_ray checked)
    if mode is not None:  # token mode set already (a Ray job's driver, a shell that exported it): Ray finds its token
        if not os.environ.get(TOKEN_ENV) and token_path().is_file():
            secure_token_file(token_path())
        return
    if not os.environ.get(TOKEN_ENV):
        path = token_path()
        if not path.is_file():
            raise InputError(f"joining the Ray cluster at {target} needs its token, and there is none at {path}: copy "
                             "the cluster's token there (from the head node's ~/.ray/auth_token), or name the file "
                             f"with {TOKEN_PATH_ENV}, or put it in {TOKEN_ENV}")
        secure_token_file(path)
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()  # RAY_AUTH_MODE=token here and in every child, and Ray's config re-read


# How long an ingress replica that is stopping stays reachable behind HAProxy on a cluster raylm
# starts (Ray's default: 30 s, for external load balancers to deregister it).
HAPROXY_DRAIN_WINDOW_S = 5


def serve_ingress_env(mode: str) -> dict[str, str]:
    """Ray Serve's environment for serve.ingress on a cluster raylm starts. HAProxy's side ports
    (its Prometheus and stats pages, the fallback Python proxy it keeps behind it) get free ones
    instead of Ray's fixed 9101/8404/8500/9500, so two clusters on one machine do not collide;
    a value already in the environment wins. HAProxy binds them when Serve starts, minutes after
    they are picked (a pipeline trains first), so they come from below the kernel's ephemeral
    range (see listen_port): a free ephemeral port was taken in between and HAProxy failed to start.

    Behind HAProxy an ingress replica that stops stays reachable for a deregistration window, then
    refuses new connections (HAProxy retries them on another replica) and finishes its requests.
    Ray's 30 s window is for load balancers outside the cluster; on a cluster raylm starts only its
    own HAProxy routes to the replicas, and it reloads its backends within a second. So the window
    is HAPROXY_DRAIN_WINDOW_S: Ctrl-C on `raylm serve` returned after 35 s, ~10 s with it.

    HAProxy is started through raylm's wrapper (raylm/haproxy_rules.py): its statistics page binds
    to 127.0.0.1 instead of every interface, and requests with no key or an oversized body are
    answered by HAProxy from their headers."""
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1" if mode == "haproxy" else "0",
           "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1" if mode in ("haproxy", "direct") else "0"}
    if mode == "haproxy":
        for name in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT",
                     "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"):
            env[name] = os.environ.get(name) or str(listen_port())
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = (
            os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S") or str(HAPROXY_DRAIN_WINDOW_S))
        from raylm.haproxy_rules import install

        env.update(install())
    return env


def running_cluster() -> Optional[str]:
    """The GCS address of the Ray cluster running on this machine, as `ray.init(address="auto")`
    finds it; None when there is none. With several, the newest `ray start`'s, else an error
    listing them (joining an arbitrary one could put a promotion on the wrong endpoint)."""
    if os.environ.get("RAYLM_JOIN_RUNNING_RAY", "1") == "0":
        return None
    from ray._private import services

    found = sorted(set(services.find_gcs_addresses()))
    if len(found) <= 1:
        return found[0] if found else None
    latest = services.find_bootstrap_address(None)
    if latest in found:
        return latest
    from raylm.errors import InputError

    raise InputError(f"{len(found)} Ray clusters run on this machine ({', '.join(found)}): name one with --address "
                     "(or cluster.address / RAY_ADDRESS), or --address local for a new one")


# Ports for listeners bound later than they are picked: above Ray's worker ports (10002-19999 by
# default), below Serve's direct-ingress replica ports (30000-31000) and below the kernel's
# ephemeral range (Linux: 32768-60999; IANA's: 49152-65535), from which outgoing connections and
# `bind(0)` (Ray's own gRPC servers among them) take theirs.
LISTEN_PORT_RANGE = (20000, 30000)


def listen_port() -> int:
    """A TCP port free on every address now, for a server that binds it later. A free port from
    bind(0) is an ephemeral one, which any outgoing connection may take before the server starts;
    one below the ephemeral range is taken only by a server that asks for it by number."""
    import random
    import socket

    low, high = LISTEN_PORT_RANGE
    try:
        high = min(high, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        pass
    for candidate in random.sample(range(low, high), min(64, max(high - low, 0))):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", candidate))
            except OSError:
                continue
            return candidate
    return _free_port(0)


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
