"""Write k8s/monitoring/raylm-serve-dashboard.json, the Grafana dashboard of a raylm endpoint.

It starts from Ray's own Serve LLM dashboard (ray.dashboard.modules.metrics.dashboards.
serve_llm_dashboard_panels, the one `ray start` provisions): its TTFT, scheduler, KV-cache and
token panels are taken as they are, with their PromQL (which joins vLLM's per-engine series to
Serve's deployment and replica by WorkerId). What Ray's dashboard lacks for raylm is added in the
same style: raylm's own request counter by endpoint and status, per-key usage, inter-token
latency, and the Serve replicas per RayCluster (two clusters serve side by side during a KubeRay
incremental upgrade). Ray's panels that cite metrics vLLM 0.32 no longer exports (`Scheduler:
Swapped`, the NIXL row) are left out; tests/unit/test_grafana_dashboard.py checks every metric
name against the installed sources.

    python scripts/grafana_dashboard.py           # rewrite the JSON
    python scripts/grafana_dashboard.py --check   # exit 1 if the committed JSON is stale

Ray's dashboard factory renders the panels (the same templates, the datasource, `$Cluster`,
`$deployment`, `$vllm_model_name`, `$workerid` and `$interval` variables); importing it needs
only the pinned Ray, no running cluster.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ray.dashboard.modules.metrics import grafana_dashboard_factory as factory
from ray.dashboard.modules.metrics.dashboards import serve_llm_dashboard_panels as ray_llm
from ray.dashboard.modules.metrics.dashboards.common import DashboardConfig, Panel, Row, Target

OUT = Path(__file__).resolve().parents[1] / "k8s" / "monitoring" / "raylm-serve-dashboard.json"
UID = "raylmServeDashboard"
TITLE = "raylm Serve"
# Ray's Serve LLM panels kept as they are, by title, per row of this dashboard.
RAY_LATENCY = ("TTFT -- Mean", "TTFT -- P50", "TTFT -- P90")
RAY_ENGINE = ("Scheduler: Running", "Scheduler: Waiting", "Cache Utilization", "GPU KV Cache Hit Rate",
              "Prompt Tokens/s", "Generation Tokens/s", "Queue Time")


def sel(*matchers: str) -> str:
    """A label selector in the form Ray's factory expects: it `.format`s every expression, putting
    the dashboard's filters (ray_io_cluster=~"$Cluster") at {global_filters}; braces are doubled."""
    return "{{" + ", ".join([*matchers, "{global_filters}"]) + "}}"


def ray_panels(titles: tuple[str, ...]) -> list[Panel]:
    """Ray's Serve LLM panels by title, laid out afresh (their grid positions belong to Ray's page)."""
    by_title = {p.title: p for row in ray_llm.serve_llm_dashboard_config.rows for p in row.panels}
    return [dataclasses.replace(by_title[t], grid_pos=None) for t in titles]


def graph(title: str, description: str, unit: str, *targets: tuple[str, str], stack: bool = False) -> Panel:
    return Panel(title=title, description=description, id=0, unit=unit,
                 targets=[Target(expr=e, legend=legend) for e, legend in targets], fill=1, linewidth=2, stack=stack)


def request_panels() -> list[Panel]:
    proxy, errors = sel('route!~"/-/.*"'), sel('status=~"4..|5.."')
    return [
        graph("Requests / s by endpoint and status",
              "raylm's own counter (raylm_requests, tags endpoint and status), counted by the API gate, so it "
              "includes 401/413/429 answered before the engine.", "reqps",
              (f"sum by (endpoint, status) (rate(ray_raylm_requests_total{sel()}[$interval]))",
               "{{endpoint}} {{status}}"), stack=True),
        graph("Error ratio by endpoint", "Share of answers with a 4xx or 5xx status.", "percentunit",
              (f'sum by (endpoint) (rate(ray_raylm_requests_total{errors}[$interval])) '
               f"/ sum by (endpoint) (rate(ray_raylm_requests_total{sel()}[$interval]))", "{{endpoint}}")),
        graph("Serve proxy: requests / s by route and status code",
              "Every HTTP request Serve's proxy (or direct ingress) saw, health checks excluded.", "reqps",
              (f"sum by (route, status_code) (rate(ray_serve_num_http_requests_total{proxy}[$interval]))",
               "{{route}} {{status_code}}"), stack=True),
        graph("Serve proxy: errors / s by route and error code", "", "reqps",
              (f"sum by (route, error_code) (rate(ray_serve_num_http_error_requests_total{proxy}[$interval]))",
               "{{route}} {{error_code}}"), stack=True),
        graph("Serve proxy: latency P50 / P99 by route", "End to end at the proxy; streams count until their last "
              "chunk.", "ms",
              (f"histogram_quantile(0.5, sum by (route, le) (rate(ray_serve_http_request_latency_ms_bucket"
               f"{proxy}[$interval])))", "P50 {{route}}"),
              (f"histogram_quantile(0.99, sum by (route, le) (rate(ray_serve_http_request_latency_ms_bucket"
               f"{proxy}[$interval])))", "P99 {{route}}")),
        graph("Requests / s by RayCluster", "During a KubeRay incremental upgrade the old and the new cluster "
              "both serve; this shows the traffic moving (needs the ray_io_cluster label, see "
              "k8s/monitoring/podmonitor.yaml).", "reqps",
              (f"sum by (ray_io_cluster) (rate(ray_serve_num_http_requests_total{proxy}[$interval]))",
               "{{ray_io_cluster}}"), stack=True),
    ]


def key_panels() -> list[Panel]:
    """Per-key counters carry a key id (a hash prefix), never the key."""
    return [
        graph("Requests / s by key", "raylm_key_requests by key_id.", "reqps",
              (f"sum by (key_id) (rate(ray_raylm_key_requests_total{sel()}[$interval]))", "{{key_id}}"), stack=True),
        graph("Tokens / s by key", "raylm_key_tokens by key_id.", "none",
              (f"sum by (key_id) (rate(ray_raylm_key_tokens_total{sel()}[$interval]))", "{{key_id}}"), stack=True),
        graph("Top 10 keys by tokens, last hour", "", "none",
              (f"topk(10, sum by (key_id) (increase(ray_raylm_key_tokens_total{sel()}[1h])))", "{{key_id}}")),
    ]


def latency_panels() -> list[Panel]:
    """Ray's TTFT panels, and inter-token latency (vLLM's ITL histogram) built with Ray's own helpers."""
    itl = "ray_vllm_inter_token_latency_seconds"
    legend = "{{deployment}}: {{replica}}"
    return [
        *ray_panels(RAY_LATENCY),
        graph("Inter-token latency -- Mean", "Time between two output tokens of a stream (vLLM's ITL).", "s",
              (ray_llm._mean_with_join(itl), legend)),
        graph("Inter-token latency -- P50", "", "s", (ray_llm._percentile_with_join(itl, 0.5), legend)),
        graph("Inter-token latency -- P99", "", "s", (ray_llm._percentile_with_join(itl, 0.99), legend)),
    ]


def replica_panels() -> list[Panel]:
    return [
        graph("Healthy replicas by deployment and RayCluster", "", "none",
              (f"sum by (application, deployment, ray_io_cluster) (ray_serve_deployment_replica_healthy{sel()})",
               "{{ray_io_cluster}} {{application}}/{{deployment}}"), stack=True),
        graph("Autoscaler: target replicas", "What Serve's autoscaler is moving towards.", "none",
              (f"sum by (application, deployment) (ray_serve_autoscaling_target_replicas{sel()})",
               "{{application}}/{{deployment}}")),
        graph("Requests in flight per replica", "", "none",
              (f"sum by (deployment, replica) (ray_serve_replica_processing_queries{sel()})",
               "{{deployment}}: {{replica}}")),
        graph("Requests queued for a replica", "Waiting in a handle's router for a free replica "
              "(max_ongoing_requests reached everywhere).", "none",
              (f"sum by (application, deployment) (ray_serve_deployment_queued_queries{sel()})",
               "{{application}}/{{deployment}}")),
        graph("Replica restarts", "Replicas restarted after a failure.", "none",
              (f"sum by (deployment) (increase(ray_serve_deployment_replica_starts_total{sel()}[$interval]))",
               "{{deployment}}")),
    ]


def dashboard_config() -> DashboardConfig:
    rows = [("Requests and errors", request_panels()), ("Per-key usage", key_panels()),
            ("Latency (vLLM)", latency_panels()), ("Engine: queue, KV cache, tokens (vLLM)", ray_panels(RAY_ENGINE)),
            ("Replicas (Serve)", replica_panels())]
    next_id, out = 1, []
    for title, panels in rows:
        row_id, next_id = next_id, next_id + 1
        numbered = []
        for panel in panels:
            numbered.append(dataclasses.replace(panel, id=next_id))
            next_id += 1
        out.append(Row(title=title, id=row_id, panels=numbered))
    return DashboardConfig(name="RAYLM_SERVE", default_uid=UID, standard_global_filters=['ray_io_cluster=~"$Cluster"'],
                           base_json_file_name=ray_llm.serve_llm_dashboard_config.base_json_file_name, rows=out)


def build() -> dict:
    """The dashboard as a dict: Ray's factory output, retitled and without its per-version tag."""
    content, _ = factory._generate_grafana_dashboard(dashboard_config())
    board = json.loads(content)
    for variable in board["templating"]["list"]:  # Ray hides it (its Grafana has one Prometheus); show it
        if variable["name"] == "datasource":
            variable["hide"] = 0
            variable["label"] = "Data source"
    board["title"] = TITLE
    board["tags"] = ["raylm", "ray-serve", "vllm"]
    board["description"] = ("raylm endpoint: requests and errors, per-key usage, TTFT and inter-token latency, "
                            "vLLM queue and KV cache, Serve replicas. Generated by scripts/grafana_dashboard.py "
                            "from Ray's Serve LLM dashboard.")
    return board


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        stale = not OUT.is_file() or OUT.read_text() != text
        print(f"{OUT} is {'stale: run scripts/grafana_dashboard.py' if stale else 'up to date'}")
        return int(stale)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
