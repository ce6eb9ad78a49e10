"""A real Prometheus (Debian's package) set up as the README says, scraping `latentmoe serve`'s local cluster.

After a short load every panel query of deploy/grafana/latentmoe.json returns data (the fault panels aside:
no fault happens here), every target Ray's discovery file lists is up, and those targets are this cluster's.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import yaml

from latentmoe.cluster.communicator import free_port
from latentmoe.loadtest.local_server import wait_ready
from tests.actors.sandbox import PROMPT, Server, sandbox, serving

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
# panels of events a short, healthy load does not make (their queries are checked to answer, with no data)
# panels of events that do not happen here (no fault, no scaling, no rebalance)
FAULT_PANELS = {"Shard faults and recoveries", "Scale-outs, scale-ins and moved requests", "Expert rebalances"}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads((GRAFANA / "latentmoe.json").read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_dir):
    with serving(sandbox(tmp_path_factory.mktemp("prometheus")), tiny_dir) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory):
    """The shipped scrape config, with only the interval shortened and the discovery file under RAY_TMPDIR."""
    assert shutil.which("prometheus"), "Debian's prometheus package is missing: run scripts/setup-system.sh"
    work = tmp_path_factory.mktemp("prom")
    config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    (job,) = config["scrape_configs"]
    shipped = job["file_sd_configs"][0]["files"][0]
    assert shipped == "/tmp/ray/prom_metrics_service_discovery.json"
    job["file_sd_configs"][0]["files"] = [shipped.replace("/tmp", served.env["RAY_TMPDIR"], 1)]
    job["file_sd_configs"][0]["refresh_interval"] = "2s"
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(work / "prometheus.log", "w")
    proc = subprocess.Popen(["prometheus", f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/-/ready", timeout=30, interval=0.5, request_timeout=2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def query(url: str, expr: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["data"]["result"]


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def load(server: Server, seconds: float) -> int:
    """Streamed and plain completions, two at a time, for ``seconds``."""
    done, errors, model = [], [], server.model_name

    def worker(stream: bool):
        end = time.time() + seconds
        while time.time() < end:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stream": stream}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
                r.read()
                if r.status_code != 200:
                    errors.append(r.text)
                    return
            done.append(1)

    threads = [threading.Thread(target=worker, args=(s,)) for s in (True, False)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return len(done)


def test_every_panel_has_data(served, prometheus):
    assert load(served, 20) > 10
    queries = [(title, expr) for title, expr in panel_queries() if title not in FAULT_PANELS]
    assert len(queries) >= 15
    deadline = time.time() + 90
    while True:
        empty = [(title, expr) for title, expr in queries if not has_data(query(prometheus, expr))]
        if not empty or time.time() > deadline:
            break
        load(served, 3)
    assert not empty, f"panels without data: {empty}"
    # the fault panels' queries are well formed (they answer, with nothing to show)
    for title, expr in panel_queries():
        if title in FAULT_PANELS:
            query(prometheus, expr)


def test_targets_are_this_clusters_and_up(served, prometheus):
    targets = httpx.get(prometheus + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    ray_targets = [t for t in targets if t["labels"]["job"] == "ray"]
    down = [(t["scrapeUrl"], t["lastError"]) for t in ray_targets if t["health"] != "up"]
    assert not down, down
    # one endpoint per node of this cluster, plus the head's dashboard and autoscaler exporters
    assert len(ray_targets) == len(served.state()["nodes"]) + 2, [t["scrapeUrl"] for t in ray_targets]
    # and every series they export is labelled with this server's Ray session, not an older one's
    session = (Path(served.env["RAY_TMPDIR"]) / "ray" / "session_latest").resolve().name
    sessions = query(prometheus, 'group by (instance, SessionName) ({job="ray", SessionName!=""})')
    assert {s["metric"]["SessionName"] for s in sessions} == {session}
    assert {s["metric"]["instance"] for s in sessions} == {t["labels"]["instance"] for t in ray_targets}
