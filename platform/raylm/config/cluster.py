"""`cluster:`: which Ray cluster to join, and the KubeRay pods the manifests describe."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raylm.config.base import PYTHON_TAG, RAY_VERSION, _Strict


class ServeUpgradeConfig(_Strict):
    """KubeRay's `upgradeStrategy.clusterUpgradeOptions` for NewClusterWithIncrementalUpgrade: a new
    RayCluster grows in steps of max_surge_percent of the Serve replicas while a Gateway API HTTPRoute
    moves step_size_percent of the traffic to it every interval_s, and the old cluster shrinks by the
    same steps. Only max_surge_percent extra capacity is ever needed, not a second full cluster."""

    gateway_class_name: str = Field(
        "istio", min_length=1, description="metadata.name of the GatewayClass KubeRay creates the RayService's "
        "Gateway (HTTP, port 80) and HTTPRoute with; the cluster needs the Gateway API CRDs and that controller."
    )
    max_surge_percent: int = Field(
        25, ge=0, le=100, description="Share of the Serve replicas the new cluster adds per step (its "
        "target_capacity grows by this); 100 / worker pods holding replicas adds one pod at a time."
    )
    step_size_percent: int = Field(
        5, ge=0, le=100, description="Share of the traffic moved from the old cluster to the new one every "
        "interval_s; at most max_surge_percent (KubeRay refuses more)."
    )
    interval_s: int = Field(
        30, ge=1, description="Seconds between two traffic steps (KubeRay's intervalSeconds)."
    )

    @model_validator(mode="after")
    def _step_within_surge(self) -> "ServeUpgradeConfig":
        if self.step_size_percent > self.max_surge_percent:  # KubeRay's ValidateClusterUpgradeOptions rule
            raise ValueError(f"step_size_percent={self.step_size_percent} exceeds max_surge_percent="
                             f"{self.max_surge_percent}; KubeRay refuses such a RayService")
        return self

    def cluster_upgrade_options(self) -> dict[str, int | str]:
        """The CRD's clusterUpgradeOptions, in its own field names."""
        return {"gatewayClassName": self.gateway_class_name, "maxSurgePercent": self.max_surge_percent,
                "stepSizePercent": self.step_size_percent, "intervalSeconds": self.interval_s}


class ClusterConfig(_Strict):
    address: Optional[str] = Field(
        None, description="Ray address; None uses RAY_ADDRESS or starts a local cluster."
    )
    namespace: str = Field("raylm", description="Ray namespace and Kubernetes namespace.")
    image: str = Field(
        f"raylm:{RAY_VERSION}-{PYTHON_TAG}-gpu",
        description="Project image every KubeRay pod runs, built from k8s/Dockerfile (FROM "
        f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu, tagged like it); prefix your registry.",
    )
    head_cpus: int = Field(2, ge=1, description="CPUs of the head pod (also its Ray num-cpus; it gets no GPU).")
    head_memory: str = Field("8Gi", description="Memory request/limit of the head pod (Kubernetes quantity).")
    worker_cpus: int = Field(8, ge=1, description="CPUs of each GPU worker pod (also its Ray num-cpus).")
    worker_memory: str = Field("32Gi", description="Memory request/limit of each worker pod (Kubernetes quantity).")
    worker_gpus: int = Field(1, ge=0, description="nvidia.com/gpu requested (and limited) per worker pod.")
    worker_min_replicas: int = Field(0, ge=0, description="Fewest worker pods the autoscaler keeps.")
    worker_max_replicas: int = Field(4, ge=1, description="Most worker pods the autoscaler starts.")
    autoscaler_idle_timeout_s: int = Field(
        300, ge=0, description="Seconds a worker pod stays idle before the autoscaler removes it (GPUs cost)."
    )
    storage_claim: Optional[str] = Field(
        "raylm-results",
        description="ReadWriteMany PVC mounted on every Ray pod at storage_mount_path, so a local "
        "train.storage_path under it is shared by all nodes; None when storage is s3:// or gs://.",
    )
    storage_mount_path: str = Field("/mnt/shared", description="Where storage_claim is mounted in the pods.")
    service_account: Optional[str] = Field(
        None, description="Kubernetes ServiceAccount of the Ray pods (e.g. one with bucket access); None: default."
    )
    auth_secret: str = Field(
        "raylm-ray-auth",
        description="Kubernetes Secret (key auth_token) holding the Ray auth token; KubeRay's authOptions "
        "uses it, so `ray job submit` clients can read the same token.",
    )
    api_keys_secret: str = Field(
        "raylm-api-keys",
        description="Kubernetes Secret (key api_keys) exposed to the RayService pods as serve.api_key_env.",
    )
    sweep_config: str = Field(
        "tune_configs/small_sweep.yaml",
        description="Repo-relative sweep file the rendered RayJob runs; the RayService serves its best.json.",
    )
    storage_secret: Optional[str] = Field(
        None, description="Kubernetes Secret whose keys become env vars of every Ray container: object-storage "
        "credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)."
    )
    autoscaler_version: Literal["v1", "v2"] = Field(
        "v2", description="KubeRay autoscaler: v2 (Ray's newer autoscaler, KubeRay >= 1.4) or v1."
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the GPU worker pods (e.g. a GPU node pool's label)."
    )
    # ---- RayJob (train and sweep)
    job_submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = Field(
        "K8sJobMode", description="How KubeRay submits the job: a Kubernetes Job (retried, logs kept), the head's "
        "HTTP API from the operator, or a sidecar in the head pod."
    )
    job_backoff_limit: int = Field(
        1, ge=0, description="RayJob retries (each on a fresh cluster) before the job is marked failed; a "
        "retried train run or sweep resumes from its last checkpoint in shared storage."
    )
    job_ttl_s: int = Field(
        300, ge=0, description="Seconds after a job succeeds before its cluster is deleted (deletionStrategy)."
    )
    failed_job_keep_s: int = Field(
        86400, ge=0, description="Seconds the cluster of a failed job is kept for debugging (logs, dashboard); "
        "its idle GPU workers go after autoscaler_idle_timeout_s (KubeRay refuses DeleteWorkers when autoscaled)."
    )
    # ---- RayService
    gcs_ft_redis_address: Optional[str] = Field(
        None, description="External Redis (host:port) for GCS fault tolerance of the RayService: Serve keeps "
        "serving while the head pod restarts. None: no GCS fault tolerance."
    )
    gcs_ft_redis_secret: str = Field(
        "raylm-redis", description="Kubernetes Secret (key password) with the Redis password for GCS fault tolerance."
    )
    serve_upgrade_strategy: Literal["NewClusterWithIncrementalUpgrade", "NewCluster", "None"] = Field(
        "NewClusterWithIncrementalUpgrade", description="RayService upgrade on a change of its cluster: "
        "NewClusterWithIncrementalUpgrade (KubeRay >= 1.5, Beta in 1.7) grows a new cluster and moves traffic "
        "to it in steps through a Gateway (cluster.serve_upgrade); NewCluster starts a full second cluster and "
        "switches once it serves; None applies no cluster change (serveConfigV2 changes still go in place)."
    )
    serve_upgrade: ServeUpgradeConfig = Field(
        default_factory=ServeUpgradeConfig,
        description="Steps of the incremental upgrade (only rendered with NewClusterWithIncrementalUpgrade).",
    )
    serve_checkpoint_rollout: Literal["new_cluster", "in_place"] = Field(
        "new_cluster", description="How a new serve checkpoint reaches a running RayService. new_cluster: the "
        "checkpoint is also stamped on the pods (annotation raylm.io/checkpoint), so a promotion is a cluster "
        "upgrade by serve_upgrade_strategy and the old model serves untouched until traffic has moved. "
        "in_place: only serveConfigV2 changes and Ray Serve replaces the replicas inside the running cluster."
    )
