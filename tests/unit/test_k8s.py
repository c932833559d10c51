"""KubeRay manifests: valid against the real CRDs, in sync with the renderer, and pointing at
things that exist (verbs, configs, the Serve module, the pinned Ray image). No Ray is started."""

from __future__ import annotations

import copy
import functools
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from raylm import k8s
from raylm.cli import VERBS, main
from raylm.config import PYTHON_TAG, RAY_VERSION, ConfigError, load_config
from raylm.serve.options import EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT, deployment_options, edge_options, serve_autoscaling

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
K8S_DIR = REPO / "k8s"
CRD_OF = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
          "RayService": "ray.io_rayservices.yaml"}
SECRETISH = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.I)


# ------------------------------------------------------------------ helpers


def committed() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(K8S_DIR.glob("*.yaml"))}


def strict_k8s_schema(node):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema, as strict as the API server.

    int-or-string and nullable become type unions; objects that list their properties reject
    unknown fields (the API server's strict field validation, kubectl's default) unless marked
    x-kubernetes-preserve-unknown-fields. CEL rules (x-kubernetes-validations) are not evaluated.
    """
    if isinstance(node, list):
        return [strict_k8s_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_k8s_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str, version: str = "v1") -> jsonschema.Draft7Validator:
    path = CRD_DIR / CRD_OF[kind]
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = strict_k8s_schema(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def errors(manifest: dict) -> list[str]:
    kind = manifest["kind"]
    version = manifest["apiVersion"].split("/")[1]
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind, version).iter_errors(manifest)]


def cluster_specs() -> list[tuple[str, dict]]:
    out = []
    for name, m in committed().items():
        spec = m["spec"]
        out.append((name, spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec))
    return out


def containers(spec: dict) -> list[dict]:
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"ray\[", d)]
    return pin.split("==")[1]


def dockerfile_from() -> str:
    (line,) = [ln for ln in (K8S_DIR / "Dockerfile").read_text().splitlines() if ln.startswith("FROM ")]
    return line.split()[1]


def small():
    return load_config(REPO / "configs" / "small.yaml")


# ------------------------------------------------------------------ sync with the renderer


def test_committed_manifests_equal_a_fresh_render(tmp_path):
    written = k8s.render_to_dir(small(), str(tmp_path), config_path="configs/small.yaml", root=REPO)
    assert sorted(Path(p).name for p in written) == sorted(k8s.MANIFEST_FILES)
    assert sorted(p.name for p in K8S_DIR.glob("*.yaml")) == sorted(k8s.MANIFEST_FILES)
    for path in written:
        assert (K8S_DIR / Path(path).name).read_text() == Path(path).read_text(), \
            f"k8s/{Path(path).name} is stale: run `raylm k8s render`"


def test_cli_default_renders_the_gpu_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["k8s", "render", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / n) for n in k8s.MANIFEST_FILES]
    for name in k8s.MANIFEST_FILES:
        assert (tmp_path / name).read_text() == (K8S_DIR / name).read_text()


def test_set_without_config_is_refused_not_dropped(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["k8s", "render", "--out", str(tmp_path), "--set", "cluster.worker_max_replicas=8"]) == 2
    assert "--set needs --config" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ CRD validation


@pytest.mark.parametrize("name", k8s.MANIFEST_FILES)
def test_manifest_validates_against_its_crd(name):
    manifest = yaml.safe_load((K8S_DIR / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert errors(manifest) == []


def _break_ray_version(m):
    m["spec"]["rayVersion"] = 2.6


def _unknown_field(m):
    m["spec"]["enableInTreeAutoScaling"] = True  # typo of enableInTreeAutoscaling


def _missing_group_name(m):
    del m["spec"]["workerGroupSpecs"][0]["groupName"]


def _bad_quantity(m):
    m["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "two"


def _bad_auth_mode(m):
    m["spec"]["authOptions"]["mode"] = "password"


@pytest.mark.parametrize("breakage", [_break_ray_version, _unknown_field, _missing_group_name, _bad_quantity,
                                      _bad_auth_mode])
def test_validation_is_not_vacuous(breakage):
    manifest = copy.deepcopy(committed()["raycluster.yaml"])
    breakage(manifest)
    assert errors(manifest), f"{breakage.__name__} should be rejected"


def test_int_or_string_accepts_both_forms():
    manifest = copy.deepcopy(committed()["raycluster.yaml"])
    limits = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    limits["cpu"] = 2
    assert errors(manifest) == []
    limits["cpu"] = 2.5  # neither an integer nor a string
    assert errors(manifest)


def test_rayjob_and_rayservice_breakages_are_caught():
    job = copy.deepcopy(committed()["rayjob-train.yaml"])
    job["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert errors(job)
    svc = copy.deepcopy(committed()["rayservice.yaml"])
    del svc["spec"]["rayClusterConfig"]
    assert errors(svc)


# ------------------------------------------------------------------ pins and images


def test_ray_version_and_images_match_the_pin():
    assert pinned_ray() == RAY_VERSION
    base = f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"
    assert dockerfile_from() == base
    image = small().cluster.image
    assert image.rsplit(":", 1)[1] == base.rsplit(":", 1)[1]  # the project image is tagged like its base
    for name, spec in cluster_specs():
        assert spec["rayVersion"] == RAY_VERSION, name
        assert {c["image"] for c in containers(spec)} == {image}, name
        assert all(c["workingDir"] == k8s.WORKDIR for c in containers(spec)), name


def test_dockerfile_installs_the_project_where_the_pods_run():
    text = (K8S_DIR / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(k8s.WORKDIR)}$", text, re.M)
    for folder in ("platform", *k8s.IMAGE_CONFIG_DIRS, "deployments"):
        assert re.search(rf"^COPY .*\b{folder}/ {folder}/$", text, re.M), folder
    assert "pyproject.toml" in text and "pip install" in text


def test_dockerignore_keeps_local_state_out():
    lines = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", "results", ".git", "bench/out", "**/__pycache__", ".pytest_cache"} <= lines
    assert not lines & {"platform", "configs", "tune_configs", "deployments", "pyproject.toml", "README.md"}


# ------------------------------------------------------------------ what the manifests point at


def test_entrypoints_are_the_local_commands():
    jobs = {n: m["spec"]["entrypoint"] for n, m in committed().items() if m["kind"] == "RayJob"}
    assert jobs == {"rayjob-train.yaml": "raylm train --config configs/small.yaml",
                    "rayjob-sweep.yaml": "raylm tune --config tune_configs/small_sweep.yaml"}
    for command in jobs.values():
        prog, verb, flag, path = shlex.split(command)
        assert (prog, flag) == ("raylm", "--config") and verb in VERBS
        assert (REPO / path).is_file()
        load_config(REPO / path)


def test_jobs_run_on_their_own_cluster_and_clean_it_up_by_rules():
    cfg = small()
    for name in ("rayjob-train.yaml", "rayjob-sweep.yaml"):
        spec = committed()[name]["spec"]
        assert "rayClusterSpec" in spec and "shutdownAfterJobFinishes" not in spec  # rules replace the legacy switch
        assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == cfg.cluster.job_backoff_limit
        rules = {(tuple(r["condition"].items()), r["policy"]) for r in spec["deletionStrategy"]["deletionRules"]}
        assert ((("jobStatus", "SUCCEEDED"), ("ttlSeconds", cfg.cluster.job_ttl_s)), "DeleteCluster") in rules
        # a failed job keeps its cluster a while for debugging (its idle GPU workers go by the autoscaler)
        assert ((("jobStatus", "FAILED"), ("ttlSeconds", cfg.cluster.failed_job_keep_s)), "DeleteCluster") in rules
        assert kuberay_deletion_rule_errors(committed()[name]) == []


def kuberay_deletion_rule_errors(job: dict) -> list[str]:
    """KubeRay's checks of RayJob deletionRules beyond the CRD (ray-operator/controllers/ray/utils/
    validation.go, validateDeletionRules and validateTTLConsistency, KubeRay 1.7)."""
    spec, out, ttls = job["spec"], [], {}
    autoscaled = spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling", False)
    for i, rule in enumerate(spec.get("deletionStrategy", {}).get("deletionRules", [])):
        cond = rule["condition"]
        if ("jobStatus" in cond) == ("jobDeploymentStatus" in cond):
            out.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set")
            continue
        if autoscaled and rule["policy"] == "DeleteWorkers":
            out.append(f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled")
            continue
        key = ("jobStatus" in cond, cond.get("jobStatus", cond.get("jobDeploymentStatus")))
        if rule["policy"] in ttls.setdefault(key, {}):
            out.append(f"deletionRules[{i}]: duplicate rule")
        ttls[key][rule["policy"]] = cond.get("ttlSeconds", 0)
    for key, by_policy in ttls.items():  # Workers <= Cluster <= Self
        ordered = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        if ordered != sorted(ordered):
            out.append(f"{key}: TTLs must not decrease from DeleteWorkers to DeleteCluster to DeleteSelf")
    return out


def test_deletion_rule_checks_are_not_vacuous():
    job = copy.deepcopy(committed()["rayjob-train.yaml"])
    rules = job["spec"]["deletionStrategy"]["deletionRules"]
    rules.append({"condition": {"jobStatus": "FAILED", "ttlSeconds": 0}, "policy": "DeleteWorkers"})
    assert errors(job) == []  # the CRD allows it; the operator does not, on an autoscaled cluster
    assert "not supported with autoscaling" in " ".join(kuberay_deletion_rule_errors(job))
    job["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = False
    assert kuberay_deletion_rule_errors(job) == []
    rules[-1]["condition"]["ttlSeconds"] = 10 ** 6  # workers deleted after the cluster
    assert kuberay_deletion_rule_errors(job)


def test_cleanup_submission_and_retries_follow_the_config(tmp_path):
    cfg = load_config(REPO / "configs" / "small.yaml", ["cluster.job_submission_mode=SidecarMode",
                                                         "cluster.job_backoff_limit=0", "cluster.job_ttl_s=60"])
    job = k8s.rayjob(cfg, "raylm-train", "raylm train")
    assert errors(job) == []
    assert job["spec"]["submissionMode"] == "SidecarMode" and job["spec"]["backoffLimit"] == 0
    assert job["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["ttlSeconds"] == 60
    with pytest.raises(ConfigError, match="cluster.job_submission_mode"):
        load_config(None, ["cluster.job_submission_mode=Batch"])


def test_autoscaler_v2_gpu_pools_and_storage_credentials_from_a_secret():
    cfg = load_config(REPO / "configs" / "small.yaml", ["cluster.storage_secret=raylm-s3",
                                                         "cluster.gpu_node_selector={pool: a100}"])
    spec = k8s.ray_cluster_spec(cfg)
    assert errors({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"}, "spec": spec}) == []
    assert spec["autoscalerOptions"]["version"] == "v2"
    for c in containers(spec):
        assert c["envFrom"] == [{"secretRef": {"name": "raylm-s3"}}]
    gpu_pod = spec["workerGroupSpecs"][0]["template"]["spec"]
    assert gpu_pod["nodeSelector"] == {"pool": "a100"} and gpu_pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "nodeSelector" not in spec["headGroupSpec"]["template"]["spec"]
    assert "envFrom" not in str(k8s.ray_cluster_spec(small()))  # no secret named, none referenced


def test_rayservice_upgrades_on_a_new_cluster_with_probes_and_optional_gcs_fault_tolerance():
    spec = committed()["rayservice.yaml"]["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewClusterWithIncrementalUpgrade"
    assert "gcsFaultToleranceOptions" not in spec["rayClusterConfig"]
    head, worker = containers(spec["rayClusterConfig"])
    assert "gcs_healthz" in head["readinessProbe"]["exec"]["command"][-1]
    assert f":{small().serve.port}/-/healthz" in worker["readinessProbe"]["exec"]["command"][-1]
    # a worker without a replica has no ready proxy: that must not get it restarted
    assert "/-/healthz" not in worker["livenessProbe"]["exec"]["command"][-1]
    assert "local_raylet_healthz" in worker["livenessProbe"]["exec"]["command"][-1]
    assert worker["livenessProbe"]["failureThreshold"] > worker["readinessProbe"]["failureThreshold"]
    cfg = load_config(REPO / "configs" / "small.yaml", ["cluster.gcs_ft_redis_address=redis.raylm:6379"])
    svc = k8s.rayservice(cfg, "configs/small.yaml", load_config(REPO / "tune_configs" / "small_sweep.yaml"))
    assert errors(svc) == []
    ft = svc["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]
    assert ft["redisAddress"] == "redis.raylm:6379" and "value" not in ft["redisPassword"]
    assert ft["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "raylm-redis", "key": "password"}


# ------------------------------------------------------------------ incremental upgrade and promotion


def kuberay_upgrade_errors(svc: dict) -> list[str]:
    """The rules KubeRay's operator applies to a RayService beyond the CRD schema (CEL-free, so the
    CRD cannot hold them): ray-operator/controllers/ray/utils/validation.go, ValidateRayServiceSpec
    and ValidateClusterUpgradeOptions (KubeRay 1.7). A RayService breaking one is marked failed."""
    spec, out = svc["spec"], []
    strategy = spec.get("upgradeStrategy", {})
    if strategy.get("type", "NewCluster") not in ("NewClusterWithIncrementalUpgrade", "NewCluster", "None"):
        out.append(f"upgradeStrategy.type {strategy['type']!r} is invalid")
    if strategy.get("type") != "NewClusterWithIncrementalUpgrade":
        return out
    if not spec["rayClusterConfig"].get("enableInTreeAutoscaling"):
        out.append("Ray Autoscaler is required for NewClusterWithIncrementalUpgrade")
    options = strategy.get("clusterUpgradeOptions")
    if options is None:
        return [*out, "ClusterUpgradeOptions are required for NewClusterWithIncrementalUpgrade"]
    surge, step = options.get("maxSurgePercent", 100), options.get("stepSizePercent")
    if not 0 <= surge <= 100:
        out.append("maxSurgePercent must be between 0 and 100")
    if step is None or not 0 <= step <= 100:
        out.append("stepSizePercent must be between 0 and 100")
    elif step > surge:
        out.append("stepSizePercent must be less than or equal to maxSurgePercent")
    if options.get("intervalSeconds") is None or options["intervalSeconds"] <= 0:
        out.append("intervalSeconds must be greater than 0")
    if not options.get("gatewayClassName"):
        out.append("gatewayClassName is required for NewClusterWithIncrementalUpgrade")
    return out


def sweep():
    return load_config(REPO / "tune_configs" / "small_sweep.yaml")


def test_rayservice_uses_the_incremental_upgrade_through_a_gateway():
    svc, cl = committed()["rayservice.yaml"], small().cluster
    assert errors(svc) == [] and kuberay_upgrade_errors(svc) == []
    assert svc["spec"]["upgradeStrategy"] == {
        "type": "NewClusterWithIncrementalUpgrade",
        "clusterUpgradeOptions": {"gatewayClassName": cl.serve_upgrade.gateway_class_name,
                                  "maxSurgePercent": cl.serve_upgrade.max_surge_percent,
                                  "stepSizePercent": cl.serve_upgrade.step_size_percent,
                                  "intervalSeconds": cl.serve_upgrade.interval_s}}
    # the target_capacity steps become Serve replicas, which only the Ray autoscaler turns into pods
    assert svc["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True


def test_upgrade_options_follow_the_config_and_other_strategies_drop_them():
    cfg = load_config(REPO / "configs" / "small.yaml", ["cluster.serve_upgrade.gateway_class_name=envoy-gateway",
                                                        "cluster.serve_upgrade.max_surge_percent=50",
                                                        "cluster.serve_upgrade.step_size_percent=10",
                                                        "cluster.serve_upgrade.interval_s=60"])
    svc = k8s.rayservice(cfg, "configs/small.yaml", sweep())
    assert errors(svc) == [] and kuberay_upgrade_errors(svc) == []
    assert svc["spec"]["upgradeStrategy"]["clusterUpgradeOptions"] == {
        "gatewayClassName": "envoy-gateway", "maxSurgePercent": 50, "stepSizePercent": 10, "intervalSeconds": 60}
    for strategy in ("NewCluster", "None"):
        cfg = load_config(REPO / "configs" / "small.yaml", [f"cluster.serve_upgrade_strategy={strategy}"])
        svc = k8s.rayservice(cfg, "configs/small.yaml", sweep())
        assert svc["spec"]["upgradeStrategy"] == {"type": strategy} and errors(svc) == []


@pytest.mark.parametrize("override, field", [
    ("cluster.serve_upgrade.step_size_percent=30", "cluster.serve_upgrade"),  # > max_surge_percent (25)
    ("cluster.serve_upgrade.max_surge_percent=120", "cluster.serve_upgrade.max_surge_percent"),
    ("cluster.serve_upgrade.interval_s=0", "cluster.serve_upgrade.interval_s"),
    ("cluster.serve_upgrade.gateway_class_name=", "cluster.serve_upgrade.gateway_class_name"),
    ("cluster.serve_upgrade_strategy=Incremental", "cluster.serve_upgrade_strategy"),
    ("cluster.serve_upgrade.step_percent=5", "cluster.serve_upgrade"),  # unknown key
])
def test_upgrade_options_kuberay_would_refuse_are_refused_by_the_config(override, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(REPO / "configs" / "small.yaml", [override])


def _incremental(m):
    return m["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]


@pytest.mark.parametrize("breakage, by", [
    (lambda m: _incremental(m).pop("gatewayClassName"), "crd"),  # required by the CRD
    (lambda m: _incremental(m).update(intervalSeconds="30s"), "crd"),  # int32
    (lambda m: _incremental(m).update(maxSurge=20), "crd"),  # unknown field
    (lambda m: _incremental(m).update(stepSizePercent=50), "operator"),  # > maxSurgePercent
    (lambda m: _incremental(m).update(intervalSeconds=0), "operator"),
    (lambda m: m["spec"]["upgradeStrategy"].pop("clusterUpgradeOptions"), "operator"),
    (lambda m: m["spec"]["upgradeStrategy"].update(type="Incremental"), "operator"),
    (lambda m: m["spec"]["rayClusterConfig"].update(enableInTreeAutoscaling=False), "operator"),
])
def test_upgrade_strategy_validation_is_not_vacuous(breakage, by):
    svc = copy.deepcopy(committed()["rayservice.yaml"])
    breakage(svc)
    found = errors(svc) if by == "crd" else kuberay_upgrade_errors(svc)
    assert found, f"{by} should reject it"


def test_a_promotion_changes_the_checkpoint_and_the_pods_and_nothing_else():
    """What `kubectl apply` of a re-rendered RayService changes when only the model changes. KubeRay
    hashes rayClusterConfig to decide on a new cluster: with new_cluster rollout the checkpoint
    annotation changes that hash (incremental upgrade); with in_place the cluster is identical and
    only serveConfigV2 moves (Serve replaces the replicas in the running cluster)."""
    new = "s3://raylm-models/small-sweep/2026-12-04/best.json"
    old_svc = committed()["rayservice.yaml"]
    for rollout in ("new_cluster", "in_place"):
        before = k8s.rayservice(load_config(REPO / "configs" / "small.yaml",
                                            [f"cluster.serve_checkpoint_rollout={rollout}"]), "configs/small.yaml", sweep())
        after = k8s.rayservice(load_config(REPO / "configs" / "small.yaml", [f"cluster.serve_checkpoint_rollout={rollout}",
                                                                             f"serve.checkpoint={new}"]),
                               "configs/small.yaml", sweep())
        assert errors(after) == []
        (app_before,), (app_after,) = (yaml.safe_load(s["spec"]["serveConfigV2"])["applications"] for s in (before, after))
        assert app_after["args"]["checkpoint"] == new
        assert {**app_after, "args": app_before["args"]} == app_before  # only the checkpoint moved
        pods = [g["template"]["metadata"]["annotations"] for g in (after["spec"]["rayClusterConfig"]["headGroupSpec"],
                                                                   *after["spec"]["rayClusterConfig"]["workerGroupSpecs"])]
        if rollout == "new_cluster":
            assert all(a[k8s.CHECKPOINT_ANNOTATION] == new for a in pods)
            stripped = copy.deepcopy(after["spec"]["rayClusterConfig"])
            for g in (stripped["headGroupSpec"], *stripped["workerGroupSpecs"]):
                g["template"]["metadata"]["annotations"][k8s.CHECKPOINT_ANNOTATION] = app_before["args"]["checkpoint"]
            assert stripped == before["spec"]["rayClusterConfig"]
        else:
            assert not any(k8s.CHECKPOINT_ANNOTATION in a for a in pods)
            assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
    assert old_svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["annotations"][
        k8s.CHECKPOINT_ANNOTATION] == yaml.safe_load(old_svc["spec"]["serveConfigV2"])["applications"][0]["args"]["checkpoint"]


def test_a_checkpoint_the_pods_cannot_see_is_refused():
    with pytest.raises(ConfigError, match="serve.checkpoint='/home/me/best.json' is not visible"):
        k8s.rayservice(load_config(REPO / "configs" / "small.yaml", ["serve.checkpoint=/home/me/best.json"]),
                       "configs/small.yaml", sweep())
    on_claim = load_config(REPO / "configs" / "small.yaml", ["serve.checkpoint=/mnt/shared/models/v2/best.json"])
    svc = k8s.rayservice(on_claim, "configs/small.yaml", sweep())
    assert yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]["checkpoint"] == \
        "/mnt/shared/models/v2/best.json"


def test_rayservice_deploys_the_app_builder_over_the_sweeps_best():
    spec = committed()["rayservice.yaml"]["spec"]
    serve = yaml.safe_load(spec["serveConfigV2"])
    (app,) = serve["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("deployments.openai_app", "app_builder")
    app_file = REPO / (module.replace(".", "/") + ".py")
    assert app_file.relative_to(REPO).as_posix() == "deployments/openai_app.py"
    assert re.search(rf"^def {attr}\(", app_file.read_text(), re.M), f"no {attr} in {app_file}"
    # Serve refuses options for a deployment the app lacks: the builder names its deployments
    # SERVE_MODEL_DEPLOYMENT and EDGE_DEPLOYMENT (tests/integration/test_serve_api.py builds them for real).
    assert [dep["name"] for dep in app["deployments"]] == [SERVE_MODEL_DEPLOYMENT, EDGE_DEPLOYMENT]
    cfg, sweep = small(), load_config(REPO / "tune_configs" / "small_sweep.yaml")
    assert app["args"] == {"config": "configs/small.yaml",
                           "checkpoint": f"{sweep.train.storage_path}/{sweep.tune.sweep_name}/best.json"}
    load_config(REPO / app["args"]["config"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": cfg.serve.port}
    assert cfg.serve.use_gpu and cfg.serve.gpus_per_replica == 1
    model, edge = app["deployments"]
    assert {k: v for k, v in model.items() if k != "name"} == deployment_options(cfg.serve)
    assert {k: v for k, v in edge.items() if k != "name"} == edge_options(cfg.serve)


def test_serve_autoscaling_follows_the_config():
    cfg = load_config(REPO / "configs" / "small.yaml", ["serve.autoscaling.initial_replicas=2",
                                                        "serve.autoscaling.downscale_delay_s=90"])
    assert serve_autoscaling(cfg.serve) == {"min_replicas": 1, "initial_replicas": 2, "max_replicas": 4,
                                            "target_ongoing_requests": 16.0, "upscale_delay_s": 5.0,
                                            "downscale_delay_s": 90.0}


def test_api_keys_and_ray_token_come_from_secrets_only():
    cfg = small()
    for name, spec in cluster_specs():
        assert spec["authOptions"] == {"mode": "token", "secretName": cfg.cluster.auth_secret}, name
        for c in containers(spec):
            for env in c.get("env", []):
                if SECRETISH.search(env["name"]):
                    assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], (name, env)
    serve_env = {e["name"]: e for c in containers(committed()["rayservice.yaml"]["spec"]["rayClusterConfig"])
                 for e in c["env"]}
    assert serve_env[cfg.serve.api_key_env]["valueFrom"]["secretKeyRef"] == {
        "name": cfg.cluster.api_keys_secret, "key": k8s.API_KEYS_KEY}


def test_cpu_head_and_autoscaled_gpu_workers():
    cl = small().cluster
    for name, spec in cluster_specs():
        assert spec["enableInTreeAutoscaling"] is True and spec["autoscalerOptions"], name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"]["num-cpus"] == str(cl.head_cpus)
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
        (group,) = spec["workerGroupSpecs"]
        assert (group["minReplicas"], group["maxReplicas"]) == (cl.worker_min_replicas, cl.worker_max_replicas)
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == str(cl.worker_gpus)


def test_shared_storage_is_mounted_where_results_go():
    cfg = small()
    assert cfg.train.storage_path.startswith(cfg.cluster.storage_mount_path + "/")
    for name, spec in cluster_specs():
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            pod = group["template"]["spec"]
            claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                      if "persistentVolumeClaim" in v}
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert claims == {"shared": cfg.cluster.storage_claim}, name
            assert mounts["shared"] == cfg.cluster.storage_mount_path, name


# ------------------------------------------------------------------ refusals


def test_results_on_pod_local_disk_are_refused():
    with pytest.raises(ConfigError, match="train.storage_path='~/raylm_results'"):
        k8s.render_manifests(load_config(REPO / "configs" / "tiny.yaml"), "configs/tiny.yaml", root=REPO)
    uri = load_config(REPO / "configs" / "small.yaml", ["train.storage_path=s3://bucket/raylm"])
    k8s.check_shared_storage(uri, "x")  # a URI needs no volume


def test_a_run_that_cannot_fit_the_cluster_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.num_workers=8 .*cluster.worker_max_replicas=4"):
        k8s.render_manifests(load_config(REPO / "configs" / "base.yaml"), "configs/base.yaml", root=REPO)
    bigger = load_config(REPO / "configs" / "base.yaml", ["cluster.worker_max_replicas=8"])
    assert k8s.render_manifests(bigger, "configs/base.yaml", root=REPO)["rayjob-train.yaml"]["spec"][
        "entrypoint"] == "raylm train --config configs/base.yaml"


def test_configs_outside_the_image_are_refused(tmp_path):
    outside = tmp_path / "c.yaml"
    outside.write_text("base: " + str(REPO / "configs" / "small.yaml") + "\n")
    with pytest.raises(ConfigError, match="inside the project"):
        k8s.render_manifests(load_config(outside), str(outside), root=REPO)
    with pytest.raises(ConfigError, match="which the image holds"):
        k8s.render_manifests(small(), "pyproject.toml", root=REPO)


@pytest.mark.parametrize("name", k8s.MANIFEST_FILES)
def test_every_ray_pod_exposes_its_metrics_port_for_prometheus(name):
    spec = committed()[name]["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or spec
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        port = group["rayStartParams"]["metrics-export-port"]
        pod = group["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == port
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
        assert ports["metrics"] == int(port)


# ------------------------------------------------------------------ pinning best.json, gated promotion (issue 34)


def on_claim(tmp_path, *overrides):
    """configs/small.yaml with the shared claim mounted at tmp_path, so files there are "seen by every pod"."""
    return load_config(REPO / "configs" / "small.yaml", [f"cluster.storage_mount_path={tmp_path}",
                                                         f"train.storage_path={tmp_path}/results", *overrides])


def best_json(folder: Path, checkpoint: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.json").write_text(f'{{"checkpoint": "{checkpoint}", "metric": "val_loss"}}')
    return folder / "best.json"


def app_args(svc: dict) -> dict:
    return yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"][0]["args"]


def pod_checkpoints(svc: dict) -> set:
    spec = svc["spec"]["rayClusterConfig"]
    return {g["template"]["metadata"]["annotations"].get(k8s.CHECKPOINT_ANNOTATION)
            for g in (spec["headGroupSpec"], *spec["workerGroupSpecs"])}


def test_render_pins_a_readable_best_json_to_the_checkpoint_it_names(tmp_path):
    best = best_json(tmp_path / "sweep", "trial_3/step_400/hf")
    notes = []
    svc = k8s.render_manifests(on_claim(tmp_path, f"serve.checkpoint={best}"), "configs/small.yaml", REPO,
                               note=notes.append)["rayservice.yaml"]
    pinned = f"{tmp_path}/sweep/trial_3/step_400/hf"
    assert errors(svc) == [] and kuberay_upgrade_errors(svc) == []
    assert app_args(svc)["checkpoint"] == pinned and pod_checkpoints(svc) == {pinned}
    assert notes == [f"serve.checkpoint: {best} names {pinned} now; the RayService serves that checkpoint"]
    best_json(tmp_path / "sweep", "trial_1/step_900/hf")  # the next sweep rewrites best.json ...
    assert app_args(svc)["checkpoint"] == pinned  # ... the rendered RayService still names the model rendered


def test_render_keeps_a_best_json_it_cannot_read_and_says_it_is_mutable(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["k8s", "render", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.split() == [str(tmp_path / n) for n in k8s.MANIFEST_FILES]
    assert "mutable best.json" in err and "the sweep's best=/mnt/shared/" in err
    assert app_args(yaml.safe_load((tmp_path / "rayservice.yaml").read_text()))["checkpoint"].endswith("/best.json")


def test_a_best_json_naming_a_checkpoint_the_pods_cannot_see_is_refused(tmp_path):
    best = best_json(tmp_path / "sweep", "/home/me/hf")
    with pytest.raises(ConfigError, match=r"serve.checkpoint \(from .*best.json\)='/home/me/hf' is not visible"):
        k8s.render_manifests(on_claim(tmp_path, f"serve.checkpoint={best}"), "configs/small.yaml", REPO)


def json_patch(doc: dict, ops: list[dict]) -> dict:
    """RFC 6902 add/replace, as the API server applies `kubectl patch --type json`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert op["op"] in ("add", "replace") and (op["op"] == "add" or last in node), op
        node[last] = op["value"]
    return doc


@pytest.mark.parametrize("rollout", ["new_cluster", "in_place"])
def test_promote_renders_the_gate_as_a_rayjob_and_a_patch_of_checkpoint_and_version_only(tmp_path, rollout):
    served = tmp_path / "runs" / "v1" / "hf"
    best = best_json(tmp_path / "next-sweep", "trial_0/step_200/hf")
    cfg = on_claim(tmp_path, f"serve.checkpoint={served}", f"cluster.serve_checkpoint_rollout={rollout}")
    notes = []
    files = k8s.promote_manifests(cfg, str(best), "configs/small.yaml", REPO, version="v3", out="k8s-promote",
                                  note=notes.append)
    assert sorted(files) == sorted(k8s.PROMOTE_FILES)
    pinned = f"{tmp_path}/next-sweep/trial_0/step_200/hf"
    assert notes == [f"candidate: {best} names {pinned} now; the gate and the RayService use that checkpoint"]
    gate = files["rayjob-gate.yaml"]
    assert errors(gate) == [] and kuberay_deletion_rule_errors(gate) == []
    assert gate["metadata"]["name"] == "raylm-gate-v3"
    command = shlex.split(gate["spec"]["entrypoint"])
    assert command == ["raylm", "eval", "--config", "configs/small.yaml", pinned, "--against", str(served)]
    from raylm.cli import build_parser
    parsed = build_parser().parse_args(command[1:])  # the image's raylm takes this command line
    assert (parsed.checkpoint, parsed.against) == (pinned, str(served))
    before = k8s.render_manifests(cfg, "configs/small.yaml", REPO)["rayservice.yaml"]
    after = json_patch(before, files["rayservice-patch.json"])
    assert after == files["rayservice.yaml"]
    assert errors(after) == [] and kuberay_upgrade_errors(after) == []
    assert app_args(after) == {**app_args(before), "checkpoint": pinned, "version": "v3"}
    assert {k: v for k, v in after["spec"].items() if k != "serveConfigV2"} == json_patch(
        {k: v for k, v in before["spec"].items() if k != "serveConfigV2"},
        [{**op, "path": op["path"][len("/spec"):]} for op in files["rayservice-patch.json"][1:]])
    if rollout == "new_cluster":  # the pods' annotation moves, so KubeRay upgrades on a new cluster
        assert pod_checkpoints(after) == {pinned} and len(files["rayservice-patch.json"]) == 3
    else:
        assert after["spec"]["rayClusterConfig"] == before["spec"]["rayClusterConfig"]
        assert len(files["rayservice-patch.json"]) == 1


FAKE_KUBECTL = """#!/usr/bin/env bash
echo "$*" >> "$KUBECTL_LOG"
if [[ $3 == get ]]; then  # the statuses in turn, the last one from then on
  n=$(grep -c ' get ' "$KUBECTL_LOG"); IFS=, read -ra all <<< "$KUBECTL_STATUS"
  echo -n "${all[$(( n <= ${#all[@]} ? n - 1 : ${#all[@]} - 1 ))]}"
fi
"""


@pytest.mark.parametrize("status, rc", [("/Initializing,RUNNING/Running,SUCCEEDED/Complete", 0), ("FAILED/Failed", 3),
                                        ("/Failed", 3), ("RUNNING/Running", 4)])
def test_the_printed_commands_patch_only_after_the_gate_succeeded(tmp_path, monkeypatch, capsys, status, rc):
    import subprocess

    monkeypatch.chdir(REPO)
    served = tmp_path / "runs" / "v1" / "hf"
    candidate = tmp_path / "runs" / "v2" / "hf"
    out = tmp_path / "out"
    assert main(["k8s", "promote", "-c", "configs/small.yaml", "--set", f"cluster.storage_mount_path={tmp_path}",
                 "--set", f"train.storage_path={tmp_path}/results", "--set", f"serve.checkpoint={served}",
                 "--checkpoint", str(candidate), "--out", str(out)]) == 0
    printed, err = capsys.readouterr()
    assert printed.split() == [str(out / n) for n in k8s.PROMOTE_FILES]
    assert f"bash {out}/promote.sh" in err and "kubectl -n raylm patch rayservice raylm-serve --type json" in err
    version = "ckpt-" + __import__("hashlib").sha256(str(candidate).encode()).hexdigest()[:10]
    assert app_args(yaml.safe_load((out / "rayservice.yaml").read_text()))["version"] == version
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kubectl").write_text(FAKE_KUBECTL)
    (bin_dir / "kubectl").chmod(0o755)
    log = tmp_path / "kubectl.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "KUBECTL_LOG": str(log), "KUBECTL_STATUS": status, "POLL_S": "0.2",
           "GATE_TIMEOUT_S": "1"}
    done = subprocess.run(["bash", str(out / "promote.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == rc, done.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == f"-n raylm apply -f {out}/rayjob-gate.yaml"
    patched = [c for c in calls if " patch " in c]
    assert patched == ([f"-n raylm patch rayservice raylm-serve --type json --patch-file {out}/rayservice-patch.json"]
                       if rc == 0 else [])
    assert len([c for c in calls if " get " in c]) >= len(status.split(","))  # it waited through each status
    if rc:
        assert ("gate did not pass" if rc == 3 else "gate still running") in done.stderr
        assert "RayService is unchanged" in done.stderr


def test_promote_refuses_what_it_cannot_pin_or_name(tmp_path, monkeypatch, capsys):
    cfg = on_claim(tmp_path, f"serve.checkpoint={tmp_path}/v1/hf")
    with pytest.raises(ConfigError, match="candidate .*best.json: cannot read the best.json here"):
        k8s.promote_manifests(cfg, f"{tmp_path}/missing/best.json", "configs/small.yaml", REPO)
    with pytest.raises(ConfigError, match="candidate='/home/me/hf' is not visible"):
        k8s.promote_manifests(cfg, "/home/me/hf", "configs/small.yaml", REPO)
    with pytest.raises(ConfigError, match="--version 'v3 beta'"):
        k8s.promote_manifests(cfg, f"{tmp_path}/v2/hf", "configs/small.yaml", REPO, version="v3 beta")
    monkeypatch.chdir(REPO)
    assert main(["k8s", "promote", "--out", str(tmp_path / "out")]) == 2
    assert "name the checkpoint folder" in capsys.readouterr().err
    assert main(["k8s", "render", "--out", str(tmp_path / "out"), "--version", "v3"]) == 2
    assert not (tmp_path / "out").exists()


def test_a_users_shell_sees_the_pin_and_the_kubectl_commands(tmp_path):
    """`raylm k8s promote` as a user runs it: the CLI sends the libraries' stderr to a log file, and
    what it says to people (the pin, the commands) must still reach the terminal."""
    import subprocess
    import sys

    best = best_json(tmp_path / "sweep", "trial_0/step_200/hf")
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "raylm", "k8s", "promote", "-c", "configs/small.yaml",
                           "--set", f"cluster.storage_mount_path={tmp_path}", "--set", f"train.storage_path={tmp_path}/r",
                           "--set", f"serve.checkpoint={tmp_path}/v1/hf", "--checkpoint", str(best), "--out", str(out)],
                          cwd=REPO, env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(out / n) for n in k8s.PROMOTE_FILES]
    assert f"names {tmp_path}/sweep/trial_0/step_200/hf now" in done.stderr
    assert f"bash {out}/promote.sh" in done.stderr and "kubectl -n raylm patch rayservice" in done.stderr
