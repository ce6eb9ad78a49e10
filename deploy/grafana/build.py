"""Writes the Grafana dashboard (latentmoe.json) and its KubeRay-friendly ConfigMap from one panel list.

    .venv/bin/python deploy/grafana/build.py

Every query uses the metrics of latentmoe/actors/metrics.py as Ray exports them (prefix ``ray_``);
tests/deploy/test_grafana.py checks that the files are current and name only metrics that exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent

# (title, kind, unit, [(expr, legend)], width)
PANELS = [
    ("Expert load per shard (tokens/s)", "heatmap", "short",
     [("sum by (shard) (rate(ray_latentmoe_expert_shard_tokens_total[1m]))", "shard {{shard}}")], 24),
    ("Expert imbalance per MoE layer (max / mean, last 10 s)", "timeseries", "short",
     [("max by (layer) (ray_latentmoe_expert_imbalance)", "layer {{layer}}")], 12),
    ("Expert-shard imbalance (max / mean)", "timeseries", "short",
     [("max(ray_latentmoe_expert_shard_imbalance)", "tokens"),
      ("max(ray_latentmoe_expert_shard_work_imbalance)", "work ((token, expert) pairs)")], 12),
    ("Expert placement", "timeseries", "short",
     [("max(ray_latentmoe_expert_placement_version)", "version"),
      ("max(ray_latentmoe_expert_copies)", "redundant copies")], 12),
    ("Expert rebalances", "timeseries", "short",
     [("sum(increase(ray_latentmoe_expert_rebalances_total[5m]))", "rebalances"),
      ("sum(increase(ray_latentmoe_expert_shard_changes_total[5m]))", "expert shard count changes"),
      ("max(ray_latentmoe_expert_rebalance_seconds)", "seconds, latest")], 12),
    ("Expert shards reached per token", "timeseries", "short",
     [("sum by (devices) (rate(ray_latentmoe_tokens_by_devices_total[1m]))", "{{devices}} shard(s)")], 12),
    ("All-to-all traffic", "timeseries", "Bps",
     [("sum(rate(ray_latentmoe_all_to_all_bytes_total[1m]))", "bytes/s")], 12),
    ("Time to first token", "timeseries", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_latentmoe_time_to_first_token_seconds_bucket[1m])))",
       f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], 12),
    ("Inter-token latency", "timeseries", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_latentmoe_inter_token_latency_seconds_bucket[1m])))",
       f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], 12),
    ("End-to-end latency", "timeseries", "s",
     [(f"histogram_quantile({q}, sum by (le) (rate(ray_latentmoe_e2e_request_latency_seconds_bucket[1m])))",
       f"p{int(q * 100)}") for q in (0.5, 0.9, 0.99)], 12),
    ("Throughput", "timeseries", "short",
     [("sum(rate(ray_latentmoe_generation_tokens_total[1m]))", "output tokens/s"),
      ("sum(rate(ray_latentmoe_prompt_tokens_total[1m]))", "prompt tokens/s"),
      ("sum by (status) (rate(ray_latentmoe_requests_total[1m]))", "requests/s {{status}}")], 12),
    ("Latent cache usage", "timeseries", "percentunit",
     [("max by (shard) (ray_latentmoe_latent_cache_usage_ratio)", "attention shard {{shard}}")], 12),
    ("Requests running / waiting", "timeseries", "short",
     [("sum(ray_latentmoe_num_requests_running)", "running"), ("sum(ray_latentmoe_num_requests_waiting)", "waiting")],
     12),
    ("Shards in the collective group", "timeseries", "short",
     [("max by (kind) (ray_latentmoe_live_shards)", "{{kind}} shards")], 12),
    ("Scale-outs, scale-ins and moved requests", "timeseries", "short",
     [("sum(increase(ray_latentmoe_scale_outs_total[5m]))", "attention shards joined"),
      ("sum(increase(ray_latentmoe_scale_ins_total[5m]))", "attention shards left"),
      ("sum(increase(ray_latentmoe_requests_moved_total[5m]))", "requests moved")], 12),
    ("Shard faults and recoveries", "timeseries", "short",
     [("sum by (kind) (increase(ray_latentmoe_shard_faults_total[5m]))", "{{kind}} shards lost"),
      ("sum(increase(ray_latentmoe_recoveries_total[5m]))", "recoveries")], 12),
]


def dashboard() -> dict:
    panels, x, y = [], 0, 0
    for i, (title, kind, unit, targets, width) in enumerate(PANELS):
        if x + width > 24:
            x, y = 0, y + 8
        panel = {
            "id": i + 1, "title": title, "type": kind, "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"x": x, "y": y, "w": width, "h": 8},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + j), "expr": expr, "legendFormat": legend}
                        for j, (expr, legend) in enumerate(targets)],
        }
        if kind == "heatmap":
            panel["options"] = {"calculate": False, "yAxis": {"axisLabel": "expert shard"}}
        panels.append(panel)
        x += width
    return {
        "title": "latentmoe", "uid": "latentmoe", "schemaVersion": 39, "version": 1, "editable": True,
        "time": {"from": "now-30m", "to": "now"}, "refresh": "10s", "tags": ["latentmoe", "ray"],
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus"}]},
        "panels": panels,
    }


def configmap(text: str) -> dict:
    # the grafana_dashboard label is what Grafana's dashboard sidecar (kube-prometheus-stack) looks for
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "latentmoe-grafana-dashboard", "labels": {"grafana_dashboard": "1"}},
            "data": {"latentmoe.json": text}}


def render() -> dict[str, str]:
    text = json.dumps(dashboard(), indent=2) + "\n"
    return {"latentmoe.json": text, "configmap.yaml": yaml.safe_dump(configmap(text), sort_keys=False)}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(HERE / name)
