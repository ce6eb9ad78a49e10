"""The autoscaling test cluster itself: Ray's autoscaler keeps the ``min_workers`` nodes up, launches a role
node for an actor that asks for the role's resource, removes it once idle, and ``stop()`` leaves nothing."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
import ray

from latentmoe.actors.placement import ATTENTION_RESOURCE, EXPERT_RESOURCE, role_labels
from tests.actors.autoscaling import start_autoscaling_cluster

IDLE_TIMEOUT_MINUTES = 0.25  # Ray takes fractions: an idle attention node goes after 15 s
NODE_TYPES = {
    "attention": {"resources": {"CPU": 1, ATTENTION_RESOURCE: 1}, "labels": role_labels(ATTENTION_RESOURCE),
                  "min_workers": 0, "max_workers": 2},
    "expert": {"resources": {"CPU": 1, EXPERT_RESOURCE: 1}, "labels": role_labels(EXPERT_RESOURCE),
               "min_workers": 1, "max_workers": 1},
}


@ray.remote(num_cpus=1, resources={ATTENTION_RESOURCE: 1})
class AttentionProbe:
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


def wait_for(condition, timeout_s: float, what: str) -> float:
    """Poll ``condition`` until it holds; returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout_s, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def cluster():
    start = time.monotonic()
    c = start_autoscaling_cluster(NODE_TYPES, head_resources={}, head_num_cpus=1,
                                  idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    print(f"\nhead up in {time.monotonic() - start:.1f} s")
    try:
        ray.init(address=c.address, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.stop()  # again after test_stop_leaves_no_process: a no-op then


def test_min_workers_node_comes_up(cluster):
    took = wait_for(lambda: len(cluster.alive_nodes(EXPERT_RESOURCE)) == 1, 90, "the expert node (min_workers 1)")
    print(f"expert node (min_workers) up {took:.1f} s after the head")
    assert cluster.alive_nodes(ATTENTION_RESOURCE) == []
    head = [n for n in cluster.alive_nodes() if "node:__internal_head__" in n["Resources"]]
    assert len(head) == 1 and head[0]["Resources"]["CPU"] == 1
    assert not {ATTENTION_RESOURCE, EXPERT_RESOURCE} & set(head[0]["Resources"])


def test_actor_gets_a_new_node_that_goes_away_when_idle(cluster):
    before = {n["NodeID"] for n in cluster.alive_nodes()}
    start = time.monotonic()
    probe = AttentionProbe.remote()
    node_id = ray.get(probe.node_id.remote(), timeout=90)
    launched = time.monotonic() - start
    attention = {n["NodeID"] for n in cluster.alive_nodes(ATTENTION_RESOURCE)}
    assert node_id in attention and node_id not in before, (node_id, attention, before)
    assert len(attention) == 1, attention

    ray.kill(probe)
    removed = wait_for(lambda: not cluster.alive_nodes(ATTENTION_RESOURCE), IDLE_TIMEOUT_MINUTES * 60 + 45,
                       "the idle attention node's removal")
    print(f"\nattention node: actor placed {launched:.1f} s after it was created; node removed {removed:.1f} s "
          f"after the actor was killed (idle timeout {IDLE_TIMEOUT_MINUTES * 60:.0f} s)")
    assert len(cluster.alive_nodes(EXPERT_RESOURCE)) == 1  # min_workers stays


def test_stop_leaves_no_process(cluster):
    """Last in the module: it stops the module's cluster."""
    procs = {}  # pid -> (process group, command line) of the cluster's processes now
    for pid in cluster.pids():
        try:
            procs[pid] = (os.getpgid(pid), open(f"/proc/{pid}/cmdline", "rb").read())
        except OSError:  # ended meanwhile (an idle worker)
            pass
    raylets = [pid for pid, (_, cmdline) in procs.items() if b"/raylet/raylet" in cmdline]
    assert len(raylets) == 2, raylets  # the head's and the expert node's
    # the nodes the autoscaler started are children of the head's monitor, in the head's process group; Ray's
    # workers (``ray::IDLE``, ...) lead groups of their own
    elsewhere = {pid: (pgid, cmdline[:60]) for pid, (pgid, cmdline) in procs.items()
                 if pgid != cluster.pgid and not (cmdline.startswith(b"ray::") and pgid == pid)}
    assert elsewhere == {}
    ray.shutdown()
    cluster.stop()
    assert cluster.pids() == []
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True, timeout=30).stdout
    assert [line for line in ps.splitlines() if cluster.temp_dir in line] == []
    assert not os.path.exists(cluster.temp_dir)
