"""KubeRay manifests rendered from the one `RaylmConfig`.

`raylm k8s render` writes `k8s/raycluster.yaml`, `k8s/rayjob-train.yaml`,
`k8s/rayjob-sweep.yaml` and `k8s/rayservice.yaml`. They are derived, never hand-edited, so a
cluster runs exactly what a laptop runs: the RayJob entrypoints are the local commands
(`raylm train --config configs/small.yaml`), the pods run the project image built from
`k8s/Dockerfile`, and the sizes, storage, Serve autoscaling and secrets names all come from the
config. Rendering is pure (config in, dicts out, a fixed key order) so a test can
compare the committed files with a fresh render.

Before anything is written the render refuses what could never run on the cluster: a config
outside the image, results on pod-local disk, or a run that needs more workers than the
autoscaler may start (Ray Train would wait for them forever).
"""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Optional

import yaml

from raylm import storage
from raylm.config import RAY_VERSION, ConfigError, RaylmConfig, load_config
from raylm.errors import CheckpointError, StorageError
from raylm.servable import checkpoint_from_best_json, checkpoint_version
from raylm.serve.options import EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT, deployment_options, edge_options

API_VERSION = "ray.io/v1"
DEFAULT_CONFIG = "configs/small.yaml"
SERVE_IMPORT_PATH = "deployments.openai_app:app_builder"
WORKDIR = "/home/ray/raylm"  # the image's WORKDIR (k8s/Dockerfile): entrypoint paths are relative to it
IMAGE_CONFIG_DIRS = ("configs", "tune_configs")  # the config folders k8s/Dockerfile copies into the image
AUTH_TOKEN_KEY = "auth_token"  # the Secret key KubeRay's authOptions.secretName must hold
API_KEYS_KEY = "api_keys"  # the Secret key holding the comma-separated Serve API keys
RAY_GID = 100  # group `users` of the rayproject/ray images: fsGroup makes the shared volume writable
HEAD_PORTS = (("gcs-server", 6379), ("dashboard", 8265), ("client", 10001))
# Ray's Prometheus endpoint on every node: Serve's, raylm's and vLLM's (`ray_vllm_*`) metrics.
METRICS_PORT = 8080
DASHBOARD_PORT, DASHBOARD_AGENT_PORT = 8265, 52365
CHECKPOINT_ANNOTATION = "raylm.io/checkpoint"  # on the RayService's pods: which model they serve
MANIFEST_FILES = ("raycluster.yaml", "rayjob-train.yaml", "rayjob-sweep.yaml", "rayservice.yaml")

Manifest = dict[str, Any]


# ------------------------------------------------------------------ inputs and checks


def repo_relative(path: str | Path, root: Path) -> str:
    """The path as the image sees it (relative to WORKDIR); refuse files the image lacks."""
    full = (root / path).resolve()
    try:
        rel = PurePosixPath(full.relative_to(root.resolve()).as_posix())
    except ValueError:
        raise ConfigError(f"{path}: a KubeRay job can only use configs inside the project ({root})") from None
    if rel.parts[0] not in IMAGE_CONFIG_DIRS or not full.is_file():
        raise ConfigError(f"{path}: not a file under {' or '.join(IMAGE_CONFIG_DIRS)}/, which the image holds")
    return str(rel)


def seen_by_every_pod(cfg: RaylmConfig, path: str) -> bool:
    """An object-storage URI, or an absolute path under the claim mounted on every pod."""
    cl = cfg.cluster
    if storage.is_remote(path):
        return True
    return bool(cl.storage_claim) and PurePosixPath(path).is_absolute() and PurePosixPath(path).is_relative_to(
        PurePosixPath(cl.storage_mount_path))


def check_shared_storage(cfg: RaylmConfig, source: str) -> None:
    """Ray Train and Tune need one storage every node sees: a URI or the mounted claim."""
    path, cl = cfg.train.storage_path, cfg.cluster
    if seen_by_every_pod(cfg, path):
        return
    raise ConfigError(f"{source}: train.storage_path={path!r} would sit on one pod's local disk; use an "
                      f"s3:// or gs:// URI, or a path under cluster.storage_mount_path={cl.storage_mount_path!r} "
                      f"with cluster.storage_claim set")


def worker_slots(cfg: RaylmConfig, run: RaylmConfig) -> int:
    """Train workers of `run` the autoscaled worker group can hold at its largest."""
    cl, t = cfg.cluster, run.train
    per_pod = math.floor(cl.worker_cpus / t.cpus_per_worker)
    if t.use_gpu:
        per_pod = min(per_pod, cl.worker_gpus)
    return per_pod * cl.worker_max_replicas


def check_fits(cfg: RaylmConfig, run: RaylmConfig, source: str) -> None:
    """A run needing more workers than the cluster may start would wait forever: refuse it now."""
    slots, t, cl = worker_slots(cfg, run), run.train, cfg.cluster
    if t.num_workers > slots:
        need = f"{'1 GPU + ' if t.use_gpu else ''}{t.cpus_per_worker:g} CPU"
        raise ConfigError(f"{source}: train.num_workers={t.num_workers} (each {need}) cannot fit: "
                          f"cluster.worker_max_replicas={cl.worker_max_replicas} pods of {cl.worker_gpus} GPU / "
                          f"{cl.worker_cpus} CPU hold {slots}; raise cluster.worker_max_replicas or lower "
                          f"train.num_workers")
    if cfg.serve.gpus_per_replica > cl.worker_gpus:
        raise ConfigError(f"{source}: serve.tensor_parallel_size={cfg.serve.tensor_parallel_size} GPUs per replica "
                          f"exceeds cluster.worker_gpus={cl.worker_gpus}, so no pod can host a replica")


def resolve_inputs(cfg: RaylmConfig, config_path: Optional[str], root: Path
                   ) -> tuple[RaylmConfig, str, RaylmConfig, str]:
    """(config, its image path, sweep config, its image path), all checked for the cluster.

    With no config_path the GPU-cluster config is rendered; `cfg` is then the defaults plus any
    `--set`, which would be silently lost, so overrides without `--config` are refused.
    """
    if config_path is None:
        if cfg != RaylmConfig():
            raise ConfigError(f"k8s render: --set needs --config (the default is {DEFAULT_CONFIG})")
        config_path = DEFAULT_CONFIG
        cfg = load_config(root / DEFAULT_CONFIG)
    config_rel = repo_relative(config_path, root)
    sweep_rel = repo_relative(cfg.cluster.sweep_config, root)
    sweep = load_config(root / sweep_rel)
    for run, source in ((cfg, config_rel), (sweep, sweep_rel)):
        check_shared_storage(run, source)
        check_fits(cfg, run, source)
    return cfg, config_rel, sweep, sweep_rel


# ------------------------------------------------------------------ pods


def _metadata(cfg: RaylmConfig, name: str, component: str) -> dict:
    return {"name": name, "namespace": cfg.cluster.namespace,
            "labels": {"app.kubernetes.io/name": "raylm", "app.kubernetes.io/component": component}}


def _resources(cpus: int | str, memory: str, gpus: int = 0) -> dict:
    """Requests == limits: Ray sizes itself from the limits, and GPUs need both equal anyway."""
    amounts = {"cpu": str(cpus), "memory": memory}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _secret_env(name: str, secret: str, key: str) -> dict:
    """Secrets travel by reference only; a manifest never holds a secret value."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _volumes(cfg: RaylmConfig) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): a RAM /dev/shm for the object store and NCCL, plus the claim."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if cfg.cluster.storage_claim:
        volumes.append({"name": "shared", "persistentVolumeClaim": {"claimName": cfg.cluster.storage_claim}})
        mounts.append({"name": "shared", "mountPath": cfg.cluster.storage_mount_path})
    return volumes, mounts


def _probes(cfg: RaylmConfig, head: bool) -> dict:
    """Readiness and liveness of a RayService pod. Liveness: the raylet (and on the head the GCS)
    through the dashboard agent, i.e. is Ray alive here. Readiness adds, on workers, Serve's proxy:
    a pod takes traffic only once it serves. The proxy check must stay out of liveness: a worker
    without a replica (scaled down, or one that only trains) has no ready proxy and would be
    restarted over and over."""
    alive = [f"wget -T 2 -q -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep success"]
    if head:
        alive.append(f"wget -T 2 -q -O- http://localhost:{DASHBOARD_PORT}/api/gcs_healthz | grep success")
    ready = alive if head else [*alive, f"wget -T 2 -q -O- http://localhost:{cfg.serve.port}/-/healthz | grep success"]

    def probe(checks: list[str], **timing: int) -> dict:
        return {"exec": {"command": ["bash", "-c", " && ".join(checks)]}, "periodSeconds": 5, "timeoutSeconds": 5,
                **timing}

    return {"readinessProbe": probe(ready, failureThreshold=10, initialDelaySeconds=10),
            "livenessProbe": probe(alive, failureThreshold=120, initialDelaySeconds=30)}


def _ingress_env(cfg: RaylmConfig) -> list[dict]:
    """serve.ingress for Ray Serve on every pod (its controller and each node's ingress read it at
    start): HAProxy on each node forwards serve.port to the ingress replicas' own ports."""
    mode = cfg.serve.ingress_mode
    flags = {"haproxy": "RAY_SERVE_ENABLE_HA_PROXY", "direct": "RAY_SERVE_ENABLE_DIRECT_INGRESS"}
    return [{"name": flags[mode], "value": "1"}] if mode in flags else []


def _container(cfg: RaylmConfig, name: str, resources: dict, serve: bool, ports: list[dict]) -> dict:
    env = [_secret_env(cfg.serve.api_key_env, cfg.cluster.api_keys_secret, API_KEYS_KEY), *_ingress_env(cfg)] \
        if serve else []
    container: dict[str, Any] = {"name": name, "image": cfg.cluster.image, "imagePullPolicy": "IfNotPresent",
                                 "workingDir": WORKDIR}
    if env:
        container["env"] = env
    if cfg.cluster.storage_secret:  # object-storage credentials by reference, never in the manifest
        container["envFrom"] = [{"secretRef": {"name": cfg.cluster.storage_secret}}]
    container["ports"] = [*ports, {"name": "metrics", "containerPort": METRICS_PORT}]
    container["resources"] = resources
    container["volumeMounts"] = _volumes(cfg)[1]
    if serve:
        container.update(_probes(cfg, head=name == "ray-head"))
    return container


def _pod_template(cfg: RaylmConfig, component: str, container: dict, gpu: bool,
                  annotations: Optional[dict[str, str]] = None) -> dict:
    spec: dict[str, Any] = {}
    if cfg.cluster.service_account:
        spec["serviceAccountName"] = cfg.cluster.service_account
    spec["securityContext"] = {"fsGroup": RAY_GID}
    if gpu:  # GPU node pools are commonly tainted so that only GPU work lands there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if cfg.cluster.gpu_node_selector:
            spec["nodeSelector"] = dict(cfg.cluster.gpu_node_selector)
    spec["containers"] = [container]
    spec["volumes"] = _volumes(cfg)[0]
    # Prometheus' pod-annotation discovery scrapes every Ray node (k8s/README.md: a PodMonitor does the same).
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}
    return {"metadata": {"labels": {"app.kubernetes.io/name": "raylm", "app.kubernetes.io/component": component},
                         "annotations": {**scrape, **(annotations or {})}},
            "spec": spec}


def head_group(cfg: RaylmConfig, serve: bool = False, annotations: Optional[dict[str, str]] = None) -> dict:
    """CPU-only head: it runs drivers, GCS and the Serve proxy, never GPU work (num-gpus 0)."""
    cl = cfg.cluster
    ports = [{"name": n, "containerPort": p} for n, p in HEAD_PORTS]
    if serve:
        ports.append({"name": "serve", "containerPort": cfg.serve.port})
    container = _container(cfg, "ray-head", _resources(cl.head_cpus, cl.head_memory), serve, ports)
    return {"rayStartParams": {"num-cpus": str(cl.head_cpus), "num-gpus": "0", "dashboard-host": "0.0.0.0",
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod_template(cfg, "head", container, gpu=False, annotations=annotations)}


def worker_group(cfg: RaylmConfig, serve: bool = False, annotations: Optional[dict[str, str]] = None) -> dict:
    """The autoscaled GPU group: Train workers, Tune trials and Serve replicas all land here."""
    cl = cfg.cluster
    resources = _resources(cl.worker_cpus, cl.worker_memory, cl.worker_gpus)
    container = _container(cfg, "ray-worker", resources, serve, [])
    return {"groupName": "gpu" if cl.worker_gpus else "cpu",
            "replicas": cl.worker_min_replicas, "minReplicas": cl.worker_min_replicas,
            "maxReplicas": cl.worker_max_replicas,
            "rayStartParams": {"num-cpus": str(cl.worker_cpus), "num-gpus": str(cl.worker_gpus),
                               "metrics-export-port": str(METRICS_PORT)},
            "template": _pod_template(cfg, "worker", container, gpu=cl.worker_gpus > 0, annotations=annotations)}


def ray_cluster_spec(cfg: RaylmConfig, serve: bool = False, annotations: Optional[dict[str, str]] = None) -> dict:
    """One RayCluster spec for the standalone cluster, both RayJobs and the RayService.

    Token auth via KubeRay's `authOptions` (this CRD has it): KubeRay sets RAY_AUTH_MODE=token
    and RAY_AUTH_TOKEN from the named Secret on every Ray container, the autoscaler and the job
    submitter, so no token appears here. `annotations` go on every pod template (the RayService
    stamps its checkpoint there, see `rayservice`).
    """
    cl = cfg.cluster
    spec: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": {"mode": "token", "secretName": cl.auth_secret},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": cl.autoscaler_version, "upscalingMode": "Default",
                              "idleTimeoutSeconds": cl.autoscaler_idle_timeout_s,
                              "imagePullPolicy": "IfNotPresent",
                              "resources": _resources("500m", "512Mi")},
    }
    if serve and cl.gcs_ft_redis_address:  # Serve keeps answering while the head restarts
        spec["gcsFaultToleranceOptions"] = {
            "redisAddress": cl.gcs_ft_redis_address,
            "redisPassword": {"valueFrom": {"secretKeyRef": {"name": cl.gcs_ft_redis_secret, "key": "password"}}}}
    spec["headGroupSpec"] = head_group(cfg, serve, annotations)
    spec["workerGroupSpecs"] = [worker_group(cfg, serve, annotations)]
    return spec


# ------------------------------------------------------------------ Serve


def best_json_path(sweep: RaylmConfig) -> str:
    """Where `raylm tune` writes the sweep's best.json: <train.storage_path>/<tune.sweep_name>/."""
    return storage.best_json(storage.join(sweep.train.storage_path, sweep.tune.sweep_name))


def served_checkpoint(cfg: RaylmConfig, sweep: RaylmConfig) -> str:
    """What the RayService serves: `serve.checkpoint` when set (a promotion names the new model
    there, e.g. `--set serve.checkpoint=s3://bucket/raylm/promoted/v2/best.json`), else the sweep's
    best.json. Like the storage path it must be visible from every pod."""
    path = cfg.serve.checkpoint
    if not path:
        return best_json_path(sweep)
    return visible_to_pods(cfg, path, "serve.checkpoint")


def visible_to_pods(cfg: RaylmConfig, path: str, name: str) -> str:
    """`path`, if every pod can read it; else a ConfigError naming `name`."""
    if seen_by_every_pod(cfg, path):
        return path
    cl = cfg.cluster
    raise ConfigError(f"{name}={path!r} is not visible to the RayService pods; use an s3:// or gs:// URI, "
                      f"or a path under cluster.storage_mount_path={cl.storage_mount_path!r} with "
                      f"cluster.storage_claim set")


def names_best_json(path: str) -> bool:
    return PurePosixPath(path).name == storage.BEST_JSON or (not storage.is_remote(path) and Path(path).is_file())


def read_pin(cfg: RaylmConfig, path: str, name: str) -> tuple[Optional[str], str]:
    """(the checkpoint folder the best.json at `path` names now, ""), or (None, why it cannot be
    read from here)."""
    try:
        if storage.kind(path) != "file":
            return None, "not found from here"
        return visible_to_pods(cfg, checkpoint_from_best_json(path), f"{name} (from {path})"), ""
    except (StorageError, CheckpointError) as exc:
        return None, str(exc)


def pin_checkpoint(cfg: RaylmConfig, path: str, name: str) -> tuple[str, str]:
    """(what the RayService should name, a line saying what was done or why not).

    A sweep's best.json is rewritten by the next sweep: a RayService that names it serves whatever
    is there whenever KubeRay rebuilds the app (a new cluster, a head restart), with no gate. So a
    best.json readable from here is replaced by the checkpoint folder it names now, which no later
    run writes over. One that cannot be read here (a path on the cluster's claim, a bucket without
    credentials) stays, and the line says it is mutable. A checkpoint folder is named as it is."""
    if not names_best_json(path):
        return path, ""
    pinned, why = read_pin(cfg, path, name)
    if pinned:
        return pinned, f"{name}: {path} names {pinned} now; the RayService serves that checkpoint"
    return path, (f"warning: {name}={path}: cannot read it here ({why}), so the RayService names the mutable "
                  f"best.json: a cluster that rebuilds the app serves whatever it names then. Render where it "
                  f"can be read, or set {name} to the checkpoint folder it names")


def upgrade_strategy(cfg: RaylmConfig) -> dict:
    """The RayService's `upgradeStrategy`. With NewClusterWithIncrementalUpgrade KubeRay needs the
    Gateway API options (its ValidateClusterUpgradeOptions refuses the RayService without them) and
    the Ray autoscaler, which `ray_cluster_spec` always enables."""
    cl = cfg.cluster
    strategy: dict[str, Any] = {"type": cl.serve_upgrade_strategy}
    if cl.serve_upgrade_strategy == "NewClusterWithIncrementalUpgrade":
        strategy["clusterUpgradeOptions"] = cl.serve_upgrade.cluster_upgrade_options()
    return strategy


def checkpoint_annotations(cfg: RaylmConfig, checkpoint: str) -> dict[str, str]:
    """Pod annotations that make a new checkpoint a cluster change. KubeRay starts a new RayCluster
    only when the hash of `rayClusterConfig` changes; a change of `serveConfigV2` alone is applied to
    the running cluster, where Serve replaces the replicas in place. Stamping the checkpoint on the
    pods turns a promotion into an upgrade by `cluster.serve_upgrade_strategy` (old cluster serves
    the old model until the traffic has moved); `serve_checkpoint_rollout: in_place` leaves it out."""
    return {CHECKPOINT_ANNOTATION: checkpoint} if cfg.cluster.serve_checkpoint_rollout == "new_cluster" else {}


def serve_config(cfg: RaylmConfig, config_rel: str, checkpoint: str, version: Optional[str] = None) -> dict:
    """The Serve config file KubeRay deploys: the app builder plus the model deployment's
    options (they override the code's defaults, so the cluster follows `serve:` even if the
    app's own defaults drift). Serve hashes the app's `args` into its code version, so a new
    `checkpoint` here rebuilds the app and replaces every replica. `version`: the model version every
    response names (`raylm k8s promote` sets it; without it the app names a hash of the checkpoint)."""
    s = cfg.serve
    deployments = [{"name": SERVE_MODEL_DEPLOYMENT, **deployment_options(s)}]
    if s.edge.enabled:
        deployments.append({"name": EDGE_DEPLOYMENT, **edge_options(s)})
    app = {"name": s.app_name, "route_prefix": s.route_prefix, "import_path": SERVE_IMPORT_PATH,
           "args": {"config": config_rel, "checkpoint": checkpoint, **({"version": version} if version else {})},
           "deployments": deployments}
    return {"http_options": {"host": "0.0.0.0", "port": s.port}, "applications": [app]}


# ------------------------------------------------------------------ manifests


def raycluster(cfg: RaylmConfig) -> Manifest:
    """A long-lived cluster for `ray job submit` (the entrypoints also run as RayJobs below)."""
    return {"apiVersion": API_VERSION, "kind": "RayCluster",
            "metadata": _metadata(cfg, "raylm", "cluster"), "spec": ray_cluster_spec(cfg)}


def deletion_strategy(cfg: RaylmConfig) -> dict:
    """KubeRay's rules-based cleanup: a job that succeeded loses its cluster after job_ttl_s; a
    failed one keeps its cluster failed_job_keep_s, for logs and the dashboard. Its idle GPU
    workers go sooner, by the autoscaler (cluster.autoscaler_idle_timeout_s): KubeRay refuses a
    `DeleteWorkers` rule on an autoscaled cluster ("not supported with autoscaling enabled",
    validateDeletionRules). Results live in shared storage either way."""
    cl = cfg.cluster
    return {"deletionRules": [
        {"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": cl.job_ttl_s}, "policy": "DeleteCluster"},
        {"condition": {"jobStatus": "FAILED", "ttlSeconds": cl.failed_job_keep_s}, "policy": "DeleteCluster"},
        {"condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": cl.failed_job_keep_s}, "policy": "DeleteCluster"},
    ]}


def rayjob(cfg: RaylmConfig, name: str, entrypoint: str, component: Optional[str] = None) -> Manifest:
    """A RayJob on its own cluster, cleaned up by `deletion_strategy` (results live on shared storage)."""
    cl = cfg.cluster
    spec = {"entrypoint": entrypoint, "submissionMode": cl.job_submission_mode, "backoffLimit": cl.job_backoff_limit,
            "deletionStrategy": deletion_strategy(cfg), "rayClusterSpec": ray_cluster_spec(cfg)}
    return {"apiVersion": API_VERSION, "kind": "RayJob",
            "metadata": _metadata(cfg, name, component or name.split("-")[-1]), "spec": spec}


def rayservice(cfg: RaylmConfig, config_rel: str, sweep: RaylmConfig, checkpoint: Optional[str] = None,
               version: Optional[str] = None) -> Manifest:
    """The OpenAI-compatible endpoint over `checkpoint` (default `served_checkpoint`: by default the
    sweep's best), API keys from a Secret, upgraded without downtime by `upgrade_strategy`."""
    checkpoint = checkpoint or served_checkpoint(cfg, sweep)
    text = yaml.dump(serve_config(cfg, config_rel, checkpoint, version), Dumper=_Dumper, sort_keys=False, width=120)
    spec = {"serveConfigV2": text, "upgradeStrategy": upgrade_strategy(cfg),
            "rayClusterConfig": ray_cluster_spec(cfg, serve=True, annotations=checkpoint_annotations(cfg, checkpoint))}
    return {"apiVersion": API_VERSION, "kind": "RayService", "metadata": _metadata(cfg, "raylm-serve", "serve"),
            "spec": spec}


def entrypoint(verb: str, config_rel: str) -> str:
    """The exact local command: a cluster job runs what `raylm <verb>` runs on a laptop."""
    return shlex.join(["raylm", verb, "--config", config_rel])


def render_manifests(cfg: RaylmConfig, config_path: Optional[str] = None, root: Optional[Path] = None,
                     note: Callable[[str], None] = lambda line: None) -> dict[str, Manifest]:
    """File name -> manifest. `root` is the project checkout (default: the current directory);
    config paths are taken relative to it, as the image's WORKDIR mirrors it. `note` gets the line
    saying what the RayService's best.json was pinned to (`pin_checkpoint`)."""
    root = Path(root) if root is not None else Path.cwd()
    cfg, config_rel, sweep, sweep_rel = resolve_inputs(cfg, config_path, root)
    served = served_checkpoint(cfg, sweep)
    checkpoint, line = pin_checkpoint(cfg, served, "serve.checkpoint" if cfg.serve.checkpoint else "the sweep's best")
    if line:
        note(line)
    return {
        "raycluster.yaml": raycluster(cfg),
        "rayjob-train.yaml": rayjob(cfg, "raylm-train", entrypoint("train", config_rel)),
        "rayjob-sweep.yaml": rayjob(cfg, "raylm-sweep", entrypoint("tune", sweep_rel)),
        "rayservice.yaml": rayservice(cfg, config_rel, sweep, checkpoint=checkpoint),
    }


# ------------------------------------------------------------------ promotion


VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")  # a header value, and part of a RayJob's name
PROMOTE_FILES = ("rayjob-gate.yaml", "rayservice-patch.json", "rayservice.yaml", "promote.sh")


def service_patch(cfg: RaylmConfig, after: Manifest) -> list[dict]:
    """A JSON patch (RFC 6902) that moves a running RayService to `after`'s model and version and
    touches nothing else: the Serve config (its app args) and, with serve_checkpoint_rollout
    new_cluster, the checkpoint annotation of every pod template (`checkpoint_annotations`). A merge
    patch cannot do this: on a custom resource it would replace the whole workerGroupSpecs list."""
    spec = after["spec"]
    ops = [{"op": "replace", "path": "/spec/serveConfigV2", "value": spec["serveConfigV2"]}]
    groups = [("headGroupSpec", spec["rayClusterConfig"]["headGroupSpec"])]
    groups += [(f"workerGroupSpecs/{i}", g) for i, g in enumerate(spec["rayClusterConfig"]["workerGroupSpecs"])]
    key = CHECKPOINT_ANNOTATION.replace("~", "~0").replace("/", "~1")
    for where, group in groups:
        annotations = group["template"]["metadata"].get("annotations", {})
        if CHECKPOINT_ANNOTATION in annotations:
            ops.append({"op": "add", "path": f"/spec/rayClusterConfig/{where}/template/metadata/annotations/{key}",
                        "value": annotations[CHECKPOINT_ANNOTATION]})
    return ops


def promote_script(cfg: RaylmConfig, gate_name: str, out: str, version: str) -> str:
    """The kubectl commands of a gated promotion: the gate's RayJob, a wait for its verdict (a
    failed gate stops here, the RayService untouched), then the patch."""
    ns, out = cfg.cluster.namespace, shlex.quote(out)
    return f"""#!/usr/bin/env bash
# Rendered by `raylm k8s promote` (platform/raylm/k8s.py): the eval gate on the cluster, then the patch.
set -euo pipefail
GATE_TIMEOUT_S=${{GATE_TIMEOUT_S:-21600}}  # how long to wait for the gate's verdict
POLL_S=${{POLL_S:-10}}
kubectl -n {ns} apply -f {out}/rayjob-gate.yaml
until status=$(kubectl -n {ns} get rayjob {gate_name} -o jsonpath='{{.status.jobStatus}}/{{.status.jobDeploymentStatus}}') \\
      && [[ $status == SUCCEEDED/* || $status == FAILED/* || $status == STOPPED/* || $status == */Failed ]]; do
  if (( SECONDS > GATE_TIMEOUT_S )); then
    echo "gate still running after ${{GATE_TIMEOUT_S}} s (${{status:-no status}}): the RayService is unchanged" >&2
    exit 4
  fi
  sleep "$POLL_S"
done
if [[ $status != SUCCEEDED/* ]]; then
  echo "gate did not pass ($status): the RayService is unchanged; logs: kubectl -n {ns} logs -l job-name={gate_name}" >&2
  exit 3
fi
kubectl -n {ns} patch rayservice raylm-serve --type json --patch-file {out}/rayservice-patch.json
echo "{version} rolling out: kubectl -n {ns} get rayservice raylm-serve -w"
"""


def promote_manifests(cfg: RaylmConfig, candidate: str, config_path: Optional[str] = None,
                      root: Optional[Path] = None, version: Optional[str] = None, served: Optional[str] = None,
                      out: str = "k8s-promote", note: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """`raylm k8s promote`: file name -> content. The candidate is pinned (a best.json must be
    readable here: promoting a mutable file would let the gate and the pods read different
    models); the served model is `served`, else what `render` names. The gate's RayJob runs
    `raylm eval CANDIDATE --against SERVED` on a cluster of its own; the patch names the version."""
    root = Path(root) if root is not None else Path.cwd()
    cfg, config_rel, sweep, _ = resolve_inputs(cfg, config_path, root)
    new = visible_to_pods(cfg, candidate, "candidate")
    if names_best_json(new):
        pinned, why = read_pin(cfg, new, "candidate")
        if not pinned:
            raise ConfigError(f"candidate {candidate}: cannot read the best.json here to pin the checkpoint it "
                              f"names ({why}); name the checkpoint folder itself")
        note(f"candidate: {candidate} names {pinned} now; the gate and the RayService use that checkpoint")
        new = pinned
    current, line = pin_checkpoint(cfg, served_or(cfg, sweep, served), "served model")
    if line:
        note(line)
    version = version or checkpoint_version(new)
    if not VERSION_RE.match(version):
        raise ConfigError(f"--version {version!r}: letters, digits, '.', '_' and '-' only, at most 40, "
                          f"starting with a letter or digit (it becomes a header value and a RayJob name)")
    gate_name = "raylm-gate-" + re.sub(r"[^a-z0-9-]", "-", version.lower()).strip("-")
    gate = rayjob(cfg, gate_name, shlex.join(["raylm", "eval", "--config", config_rel, new, "--against", current]),
                  component="gate")
    after = rayservice(cfg, config_rel, sweep, checkpoint=new, version=version)
    return {"rayjob-gate.yaml": gate, "rayservice-patch.json": service_patch(cfg, after), "rayservice.yaml": after,
            "promote.sh": promote_script(cfg, gate_name, out, version)}


def served_or(cfg: RaylmConfig, sweep: RaylmConfig, served: Optional[str]) -> str:
    return visible_to_pods(cfg, served, "--served") if served else served_checkpoint(cfg, sweep)


def promote_to_dir(cfg: RaylmConfig, candidate: str, out_dir: str, config_path: Optional[str] = None,
                   root: Optional[Path] = None, version: Optional[str] = None, served: Optional[str] = None,
                   note: Callable[[str], None] = lambda line: None) -> list[str]:
    """Write `promote_manifests` into `out_dir` (nothing if a check fails); returns the paths."""
    root = Path(root) if root is not None else Path.cwd()
    files = promote_manifests(cfg, candidate, config_path, root, version, served, out_dir, note)
    return write_files(files, out_dir, repo_relative(config_path or DEFAULT_CONFIG, root), "promote")


# ------------------------------------------------------------------ YAML


class _Dumper(yaml.SafeDumper):
    """Safe YAML with multi-line strings (serveConfigV2) as readable `|` blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifest: Manifest, config_rel: str, verb: str = "render") -> str:
    """Deterministic text: insertion order (apiVersion, kind, metadata, spec) and a provenance line."""
    header = f"# Rendered by `raylm k8s {verb} --config {config_rel}` (platform/raylm/k8s.py). Do not edit.\n"
    return header + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=120)


def render_to_dir(cfg: RaylmConfig, out_dir: str, config_path: Optional[str] = None,
                  root: Optional[Path] = None, note: Callable[[str], None] = lambda line: None) -> list[str]:
    """Render every manifest into `out_dir`; returns the written paths. Nothing is written if
    the config cannot run on the cluster (all checks happen before the first file)."""
    root = Path(root) if root is not None else Path.cwd()
    manifests = render_manifests(cfg, config_path, root, note)
    return write_files(manifests, out_dir, repo_relative(config_path or DEFAULT_CONFIG, root), "render")


def write_files(files: dict[str, Any], out_dir: str, config_rel: str, verb: str) -> list[str]:
    """Write each file by its kind: a manifest as YAML (`to_yaml`), a JSON patch as JSON, a script
    as an executable; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        path = out / name
        if name.endswith(".yaml"):
            path.write_text(to_yaml(content, config_rel, verb))
        elif name.endswith(".json"):
            path.write_text(json.dumps(content, indent=2) + "\n")
        else:
            path.write_text(content)
            path.chmod(0o755)
        written.append(str(path))
    return written
