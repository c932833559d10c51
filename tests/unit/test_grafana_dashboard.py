"""The Grafana dashboard (k8s/monitoring/raylm-serve-dashboard.json) and the PodMonitor beside it.

The dashboard is a valid Grafana dashboard (panels with targets, unique ids, a datasource
variable), is what scripts/grafana_dashboard.py renders from Ray's Serve LLM dashboard, and
queries only metric names that exist. Those names are read from the installed sources, so the test
fails when a name drifts: vLLM's metric definitions, Ray Serve's, and raylm's own counters, as
Ray exports them to Prometheus. No Ray is started.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

from raylm import k8s
from raylm.config import load_config

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "monitoring"
DASHBOARD = MONITORING / "raylm-serve-dashboard.json"
PODMONITOR = MONITORING / "podmonitor.yaml"
# the installed packages' sources, found without importing them (vLLM's import is slow)
RAY_DIR, VLLM_DIR = (Path(importlib.util.find_spec(p).origin).parent for p in ("ray", "vllm"))

# How Ray names a metric in Prometheus. ray/_private/telemetry/open_telemetry_metric_recorder.py
# registers every metric as f"{NAMESPACE}_{name}" with NAMESPACE = "ray"; the OpenTelemetry
# Prometheus exporter it uses (PrometheusMetricReader) writes counters as OpenMetrics counters,
# which get `_total`, and histograms as `_bucket`, `_sum` and `_count`. vLLM's Ray stat logger
# (vllm/v1/metrics/ray_wrappers.py, _get_sanitized_opentelemetry_name) turns vLLM's `vllm:x` into
# `vllm_x` before Ray prefixes it.
SUFFIXES = {"Counter": ("_total",), "Gauge": ("",), "Histogram": ("_bucket", "_sum", "_count")}
# raylm counters not yet defined in platform/raylm that a panel may cite ahead of them (none now:
# the per-key counters live in serve/app.py, tag key_id, a key id, never the key).
ANNOUNCED_RAYLM: dict[str, str] = {}
# Ray's own Serve LLM dashboard cites these, but vLLM 0.32 no longer defines them: the reason the
# generator leaves those panels out, and proof that the check below bites.
GONE_FROM_VLLM = ("ray_vllm_num_requests_swapped",)


# ------------------------------------------------------------------ known metric names


def _metric_calls(path: Path, receivers: tuple[str, ...], bare: bool = False) -> list[tuple[str, str]]:
    """(kind, name) of every `<receiver>.Counter|Gauge|Histogram(name, ...)` call in a file (or a
    bare `Gauge(name, ...)` with `bare`), and of vLLM's `self._counter_cls(name=...)` style.
    f-string names over a protocol are expanded to HTTP and gRPC
    (ray/serve/_private/request_ingress_metrics.py)."""
    found, text = [], path.read_text()
    if not re.search(r"(Counter|Gauge|Histogram|_cls)\(", text):
        return found  # most of ray/serve defines no metric: skip parsing it
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, ast.Call):
            continue
        if bare and isinstance(node.func, ast.Name) and node.func.id in SUFFIXES:
            kind = node.func.id
        elif isinstance(node.func, ast.Attribute):
            attr, owner = node.func.attr, node.func.value
            kind = {"_counter_cls": "Counter", "_gauge_cls": "Gauge", "_histogram_cls": "Histogram"}.get(attr)
            if kind is None and attr in SUFFIXES and isinstance(owner, ast.Name) and owner.id in receivers:
                kind = attr
        else:
            kind = None
        if kind is None:
            continue
        arg = next((k.value for k in node.keywords if k.arg == "name"), node.args[0] if node.args else None)
        for name in _names(arg):
            found.append((kind, name))
    return found


def _names(arg) -> list[str]:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.JoinedStr):
        return ["".join(p.value if isinstance(p, ast.Constant) else protocol for p in arg.values)
                for protocol in ("http", "grpc")]
    return []


def _prometheus(kind: str, name: str) -> list[str]:
    base = "ray_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)
    return [base + suffix for suffix in SUFFIXES[kind]]


@cache
def defined() -> dict[str, list[tuple[str, str]]]:
    """Metric definitions by source, from the installed packages and this repo."""
    serve_files = sorted((RAY_DIR / "serve").rglob("*.py"))
    return {
        "vllm": _metric_calls(VLLM_DIR / "v1" / "metrics" / "loggers.py", ()),
        "ray_serve": [c for f in serve_files if "tests" not in f.parts for c in _metric_calls(f, ("metrics",))],
        "raylm": [c for f in sorted((REPO / "platform" / "raylm").rglob("*.py")) for c in _metric_calls(f, ("metrics",))],
        # node metrics of Ray's dashboard agent: the $Cluster variable lists clusters by one of them
        "ray_node": _metric_calls(RAY_DIR / "dashboard" / "modules" / "reporter" / "reporter_agent.py", (), bare=True),
    }


@cache
def known_names() -> frozenset[str]:
    calls = [c for source in defined().values() for c in source]
    own = {name for _, name in defined()["raylm"]}
    calls += [(kind, name) for name, kind in ANNOUNCED_RAYLM.items() if name not in own]
    return frozenset(n for kind, name in calls for n in _prometheus(kind, name))


def test_the_extraction_finds_what_the_dashboard_needs():
    """Not vacuous: each source yields the definitions this dashboard and Ray's are built on."""
    found = {source: {name for _, name in calls} for source, calls in defined().items()}
    assert {"vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:num_requests_waiting",
            "vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens"} <= found["vllm"]
    assert {"serve_num_http_requests", "serve_num_grpc_requests", "serve_deployment_replica_healthy",
            "serve_deployment_request_counter"} <= found["ray_serve"]
    assert "raylm_requests" in found["raylm"]
    assert "node_network_receive_speed" in found["ray_node"]
    known = known_names()
    assert {"ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_generation_tokens_total",
            "ray_vllm_kv_cache_usage_perc", "ray_serve_num_http_requests_total", "ray_raylm_requests_total"} <= known
    assert "ray_vllm_kv_cache_usage_perc_total" not in known and "ray_raylm_requests" not in known
    assert not set(GONE_FROM_VLLM) & known


# ------------------------------------------------------------------ the dashboard


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    """Top-level panels and those nested in collapsed rows."""
    out = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def exprs(board: dict) -> list[str]:
    out = [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in board["templating"]["list"] if isinstance(v.get("query"), dict)]
    return out


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: every selector here is `name{...}` (Ray's filters
    always add a label matcher), so a name is an identifier right before `{`."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{", expr))


def test_dashboard_is_a_grafana_dashboard_with_a_datasource_variable():
    board = dashboard()
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"Cluster", "interval", "deployment"} <= set(variables)
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 20
    for p in graphs:
        assert p["datasource"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"]), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
    for expr in exprs(board):  # every $variable used is defined (Grafana's built-ins aside)
        assert set(re.findall(r"\$(\w+)", expr)) <= set(variables), expr


def test_dashboard_covers_requests_keys_latency_engine_and_replicas():
    names = set().union(*map(metric_names, exprs(dashboard())))
    assert {"ray_raylm_requests_total", "ray_serve_num_http_requests_total",
            "ray_serve_num_http_error_requests_total"} <= names  # requests and errors by route and status
    assert {"ray_raylm_key_requests_total", "ray_raylm_key_tokens_total"} <= names  # per-key usage
    assert {"ray_vllm_time_to_first_token_seconds_bucket", "ray_vllm_inter_token_latency_seconds_bucket"} <= names
    assert {"ray_vllm_num_requests_waiting", "ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc"} <= names
    assert {"ray_serve_deployment_replica_healthy", "ray_serve_autoscaling_target_replicas"} <= names


def test_every_metric_the_dashboard_queries_exists():
    unknown = {name: expr for expr in exprs(dashboard()) for name in metric_names(expr) if name not in known_names()}
    assert not unknown, f"metric names no source defines: {sorted(unknown)}"
    for expr in exprs(dashboard()):
        assert metric_names(expr), f"no metric found in {expr!r}"


def test_the_name_check_bites_on_rays_own_stale_panel():
    """Ray 2.60's Serve LLM dashboard still charts `Scheduler: Swapped`, a metric vLLM 0.32 dropped."""
    from ray.dashboard.modules.metrics.dashboards import serve_llm_dashboard_panels as ray_llm

    (swapped,) = [p for row in ray_llm.serve_llm_dashboard_config.rows for p in row.panels
                  if p.title == "Scheduler: Swapped"]
    names = set().union(*(metric_names(t.expr.format(global_filters="")) for t in swapped.targets))
    assert set(GONE_FROM_VLLM) <= names and not names <= known_names()


def test_dashboard_is_what_the_generator_renders():
    spec = importlib.util.spec_from_file_location("grafana_dashboard", REPO / "scripts" / "grafana_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUT == DASHBOARD
    assert module.render() == DASHBOARD.read_text(), "stale: run scripts/grafana_dashboard.py"


# ------------------------------------------------------------------ PodMonitor


def test_podmonitor_selects_every_ray_pod_and_its_metrics_port():
    monitor = yaml.safe_load(PODMONITOR.read_text())
    cfg = load_config(REPO / "configs" / "small.yaml")
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["namespace"] == cfg.cluster.namespace
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [cfg.cluster.namespace]}
    wanted = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    manifests = [yaml.safe_load((REPO / "k8s" / n).read_text()) for n in k8s.MANIFEST_FILES]
    for m in manifests:
        spec = m["spec"].get("rayClusterConfig") or m["spec"].get("rayClusterSpec") or m["spec"]
        for group in (spec["headGroupSpec"], *spec["workerGroupSpecs"]):
            labels = group["template"]["metadata"]["labels"]
            assert wanted.items() <= labels.items(), (m["metadata"]["name"], labels)
            ports = {p["name"]: p["containerPort"] for p in group["template"]["spec"]["containers"][0]["ports"]}
            assert ports[endpoint["port"]] == k8s.METRICS_PORT
    # the dashboard's $Cluster and per-cluster panels need KubeRay's ray.io/cluster pod label as ray_io_cluster
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel["ray_io_cluster"] == ["__meta_kubernetes_pod_label_ray_io_cluster"]


@pytest.mark.parametrize("doc", ["README.md", "k8s/README.md"])
def test_docs_point_at_the_dashboard(doc):
    assert "k8s/monitoring/raylm-serve-dashboard.json" in (REPO / doc).read_text()
