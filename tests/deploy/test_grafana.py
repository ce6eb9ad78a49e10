"""The Grafana dashboard and its ConfigMap: current with their generator, and naming only metrics we export."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import yaml

from latentmoe.actors import metrics as metrics_module

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def load_builder():
    spec = importlib.util.spec_from_file_location("grafana_build", GRAFANA / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def exported_names() -> set[str]:
    """Every series name Ray exports for the metrics defined in latentmoe/actors/metrics.py."""
    source = Path(metrics_module.__file__).read_text()
    names = set()
    for kind, name in re.findall(r"metrics\.(Counter|Gauge|Histogram)\(\s*\"(\w+)\"", source):
        base = f"ray_{name}"
        names |= {base + "_bucket", base + "_sum", base + "_count"} if kind == "Histogram" else {base}
    return names


def test_files_are_current():
    for name, text in load_builder().render().items():
        assert (GRAFANA / name).read_text() == text, f"run `python deploy/grafana/build.py` ({name} is stale)"


def test_dashboard_uses_only_exported_metrics():
    dashboard = json.loads((GRAFANA / "latentmoe.json").read_text())
    exported = exported_names()
    assert len(exported) >= 14
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"ray_latentmoe_\w+", target["expr"]))
    assert used <= exported, f"unknown metrics: {sorted(used - exported)}"
    # every metric family we export is on the dashboard
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in exported}
    assert families <= {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}, families
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for what in ("Expert load per shard", "imbalance per MoE layer", "shards reached per token",
                 "Time to first token", "Inter-token latency", "Throughput", "cache usage"):
        assert what in titles


def test_configmap_is_a_valid_kubernetes_object():
    configmap = yaml.safe_load((GRAFANA / "configmap.yaml").read_text())
    kubernetes_validate.validate(configmap, "1.30", strict=True)
    assert json.loads(configmap["data"]["latentmoe.json"]) == json.loads((GRAFANA / "latentmoe.json").read_text())


def test_prometheus_config_is_valid():
    """Prometheus' own checker (Debian's prometheus package); it is run for real in tests/actors/test_prometheus.py."""
    check = subprocess.run(["promtool", "check", "config", str(GRAFANA / "prometheus.yml")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    assert [job["job_name"] for job in config["scrape_configs"]] == ["ray"]
