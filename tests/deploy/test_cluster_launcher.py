"""The cluster launcher configs (deploy/cluster*.yaml) against Ray's own validation, and the roles they give nodes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from latentmoe.actors.placement import ROLE_LABEL, role_labels

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "deploy").glob("cluster*.yaml"))
ROLES = ("attention_node", "expert_node")


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "deploy" / name).read_text())


def validated(config: dict) -> dict:
    """What `ray up` does before it touches a cloud: fill in the provider's defaults, then Ray's schema."""
    prepared = prepare_config(config)
    validate_config(prepared)
    return prepared


def test_both_configs_are_here():
    assert [p.name for p in CONFIGS] == ["cluster-local.yaml", "cluster.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validation(path):
    validated(yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("name,path,misspelt", [
    ("cluster.yaml", (), "head_start_ray_command"),
    ("cluster.yaml", ("available_node_types", "attention"), "min_worker"),
    ("cluster.yaml", ("docker",), "run_option"),
    ("cluster-local.yaml", (), "worker_start_ray_command"),
    ("cluster-local.yaml", ("auth",), "ssh_use"),
    ("cluster-local.yaml", ("provider",), "worker_ip"),
])
def test_a_misspelt_key_fails(name, path, misspelt):
    config = load(name)
    node = config
    for key in path:
        node = node[key]
    correct = next(k for k in node if k.startswith(misspelt))
    node[misspelt] = node.pop(correct)
    # Ray's schema names the unknown key; the local provider's own check names the key it misses
    with pytest.raises((jsonschema.ValidationError, click.ClickException)) as error:
        validated(config)
    assert misspelt in str(error.value) or correct in str(error.value), error.value


def test_aws_node_types_advertise_their_role_per_gpu():
    config = validated(load("cluster.yaml"))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert not set(ROLES) & set(head["resources"]) and not head["resources"].get("GPU")
    assert ROLE_LABEL not in head.get("labels", {})
    for name, role in (("attention", "attention_node"), ("expert", "expert_node")):
        resources = types[name]["resources"]
        assert resources[role] == resources["GPU"] > 0, (name, resources)
        assert not set(ROLES) - {role} & set(resources), (name, resources)
        # the label the ingress replicas stay off (latentmoe.actors.placement.off_shard_nodes)
        assert types[name]["labels"] == role_labels(role), (name, types[name].get("labels"))
        assert types[name]["min_workers"] >= 1
    assert sum(t["max_workers"] for n, t in types.items() if n != config["head_node_type"]) <= config["max_workers"]
    assert "--num-gpus=0" in config["head_start_ray_commands"][-1]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-local.yaml"])
def test_setup_installs_the_synced_checkout(name):
    config = load(name)
    mounts = config["file_mounts"]
    for local in mounts.values():
        assert (REPO / local).exists(), local
    # what pip needs to build the package: pyproject.toml, the README it names, the package itself
    assert {"./pyproject.toml", "./README.md", "./latentmoe"} <= set(mounts.values())
    assert any("~/latentmoe-src" in m for m in mounts) and any("latentmoe-src" in c for c in config["setup_commands"])


def run_worker_start(address: str, gpus: int, tmp_path: Path) -> list[str]:
    """Run cluster-local.yaml's worker start command as `ray up` would on the machine at ``address``, with fake
    `ray` and `nvidia-smi` that record what they were asked; returns the `ray start` arguments."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/ray-args\n')
    (fake / "nvidia-smi").write_text("#!/bin/sh\n" + "".join(f'echo "GPU {i}: H100"\n' for i in range(gpus)))
    for exe in ("ray", "nvidia-smi"):
        os.chmod(fake / exe, 0o755)
    command = load("cluster-local.yaml")["worker_start_ray_commands"][-1]
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "RAY_HEAD_IP": "10.0.0.1",
           "SSH_CONNECTION": f"10.0.0.1 50000 {address} 22"}
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return (tmp_path / "ray-args").read_text().splitlines()


@pytest.mark.parametrize("address,gpus,role,units", [
    ("10.0.0.2", 8, "attention_node", 8),  # listed in ATTENTION_IPS
    ("10.0.0.3", 8, "expert_node", 8),
    ("10.0.0.4", 0, "expert_node", 1),  # a machine without GPUs holds one (CPU) shard
])
def test_local_worker_role_comes_from_its_address(tmp_path, address, gpus, role, units):
    args = run_worker_start(address, gpus, tmp_path)
    assert args[0] == "start"
    assert "--address=10.0.0.1:6379" in args and f"--node-ip-address={address}" in args
    assert f'--resources={{"{role}": {units}}}' in args, args
    assert f"--labels={ROLE_LABEL}={role_labels(role)[ROLE_LABEL]}" in args, args


def test_local_head_uses_autoscaler_v1_and_holds_no_shard():
    (start,) = [c for c in load("cluster-local.yaml")["head_start_ray_commands"] if "ray start" in c]
    assert "RAY_enable_autoscaler_v2=0" in start and "--num-gpus=0" in start and "--resources" not in start
    config = validated(load("cluster-local.yaml"))
    assert config["provider"]["worker_ips"], "on-premise machines are listed, not launched"
