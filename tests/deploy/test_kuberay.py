"""deploy/kuberay/ and deploy/Dockerfile against the schemas they will meet: KubeRay's CRD (read from
../shared/schemas/kuberay/ at test time), Ray Serve's ServeDeploySchema, and Kubernetes' own (kubernetes-validate).

Kubernetes prunes unknown fields of a custom resource silently; here every object of the CRD schema is closed
(``additionalProperties: false``), as ``kubectl apply --validate=strict`` would treat it, so a misspelt key fails.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import shlex
import typing
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pydantic
import pytest
import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from latentmoe.actors.placement import role_labels

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
# KubeRay's CRDs are read where the workspace keeps them (../shared/schemas/kuberay/ next to the repository),
# never copied into it; KUBERAY_CRDS overrides.
_CRD_CANDIDATES = [Path(p) for p in (os.environ.get("KUBERAY_CRDS"),) if p] + [
    REPO.parent / "shared" / "schemas" / "kuberay", Path("/work/shared/schemas/kuberay")]
CRDS = next((p for p in _CRD_CANDIDATES if p.is_dir()), _CRD_CANDIDATES[0])
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for (native gRPC probes: >= 1.27)
ROLES = ("attention_node", "expert_node")


def load_rayservice() -> dict:
    return yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())


def serve_config() -> dict:
    return yaml.safe_load(load_rayservice()["spec"]["serveConfigV2"])


def k8s_objects() -> list[tuple[str, dict]]:
    """Every object in deploy/kuberay/*.yaml except the RayService."""
    objects = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        objects += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d and d["kind"] != "RayService"]
    return objects


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    path = CRDS / f"ray.io_{kind.lower()}s.yaml"
    if not CRDS.is_dir():  # a checkout without the workspace's schemas: say so loudly, the check cannot run
        pytest.skip(f"KubeRay CRDs not found (looked in {[str(p) for p in _CRD_CANDIDATES]}); set KUBERAY_CRDS")
    if not path.exists():
        pytest.fail(f"KubeRay CRD {path} is missing: the tests read the CRDs from ../shared/schemas/kuberay/ next to "
                    "the repository (they are not copied into it)")
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return close_objects(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def close_objects(schema):
    """Forbid unknown keys wherever the structural schema lists the keys (and doesn't keep unknown fields)."""
    if isinstance(schema, dict):
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            close_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            close_objects(value)
    return schema


def crd_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(crd_schema(doc["kind"]))
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def unknown_keys(model: type[pydantic.BaseModel], data, where: str = "") -> list[str]:
    """Keys that no field of ``model`` (recursively) declares: ServeDeploySchema itself lets them through."""
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{where}{key}")
            continue
        if key == "args":  # the application's own arguments
            continue
        for sub in _models_in(fields[key].annotation):
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                found += unknown_keys(sub, item, f"{where}{key}[{i}]." if isinstance(value, list) else f"{where}{key}.")
    return found


def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def check_import_path() -> None:
    """Fail with a clear message unless serveConfigV2's import path and gRPC servicers exist in the package, and
    the application builder accepts serveConfigV2's arguments."""
    config = serve_config()
    targets = [app["import_path"].replace(":", ".") for app in config["applications"]]
    targets += config["grpc_options"]["grpc_servicer_functions"]
    for target in targets:
        module_name, attr = target.rsplit(".", 1)
        if importlib.util.find_spec(module_name.split(".")[0]) is None:
            pytest.fail(f"serveConfigV2 names {target}, but package {module_name.split('.')[0]} is not installed")
        try:
            spec = importlib.util.find_spec(module_name)
        except ModuleNotFoundError:
            spec = None
        if spec is None:
            pytest.fail(f"serveConfigV2 names {target}, but module {module_name} does not exist "
                        f"(expected at {module_name.replace('.', '/')}.py)")
        module = importlib.import_module(module_name)
        if not callable(getattr(module, attr, None)):
            pytest.fail(f"serveConfigV2 names {target}, but {spec.origin} defines no callable {attr!r}")
    for app in config["applications"]:
        module_name, attr = app["import_path"].split(":")
        built = getattr(importlib.import_module(module_name), attr)(app["args"])  # binds; starts nothing
        assert isinstance(built, serve.Application), (app["import_path"], type(built))


# ---- the RayService against KubeRay's CRD -----------------------------------------------------------------------

def test_rayservice_validates_against_kuberay_crd():
    doc = load_rayservice()
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    assert crd_errors(doc) == []


@pytest.mark.parametrize("path,misspelt", [
    (("spec",), "serveConfigv2"),
    (("spec", "rayClusterConfig", "headGroupSpec"), "rayStartParam"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 0), "groupname"),
    (("spec", "rayClusterConfig", "workerGroupSpecs", 1, "template", "spec", "containers", 0), "readinessprobe"),
])
def test_rayservice_with_a_misspelt_key_fails(path, misspelt):
    doc = load_rayservice()
    node = doc
    for key in path:
        node = node[key]
    correct = next(k for k in node if k.lower() == misspelt.lower() or k.startswith(misspelt))
    node[misspelt] = node.pop(correct)
    assert any(misspelt in e for e in crd_errors(doc)), crd_errors(doc)


def test_worker_groups_request_gpus_and_advertise_their_role():
    cluster = load_rayservice()["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"attention", "expert"}
    args = serve_config()["applications"][0]["args"]
    for name, role in (("attention", "attention_node"), ("expert", "expert_node")):
        group = groups[name]
        (container,) = group["template"]["spec"]["containers"]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), params  # the CRD's map of strings
        assert int(params["num-gpus"]) == gpus
        # KubeRay puts `--resources=<value>` into a shell command line: parse it the way the shell will.
        (resources_json,) = shlex.split(params["resources"])
        assert json.loads(resources_json) == {role: gpus}, params["resources"]
        assert group["labels"] == role_labels(role), group.get("labels")  # what the ingress replicas stay off
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if name == "expert":  # a fixed count: exactly the role units the group advertises
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
            assert args["expert_shards"] == gpus * group["replicas"], args
        else:  # MIN:MAX, autoscaled: the minimum fits the pods that always run, the maximum the most there can be
            low, high = (int(n) for n in str(args["attention_shards"]).split(":"))
            assert low <= gpus * group["minReplicas"] and high <= gpus * group["maxReplicas"], (args, group)
            assert high > gpus * group["minReplicas"], "the autoscaler would never need another attention pod"
    assert cluster["enableInTreeAutoscaling"] is True  # Ray's autoscaler adds attention pods for Serve's shards
    head = cluster["headGroupSpec"]
    assert not set(ROLES) & set(head["rayStartParams"].get("resources", "")), "the head must hold no shard"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_probes_and_ports():
    cluster = load_rayservice()["spec"]["rayClusterConfig"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    # KubeRay builds its serve Service from the head port named "serve"; Ray's defaults elsewhere.
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "grpc": 9000}
    # KubeRay applies serveConfigV2 only once the head Pod is Ready: an application-level readiness probe on the
    # head would wait for an application that is never deployed.
    assert "readinessProbe" not in head and "startupProbe" not in head
    grpc_port = serve_config()["grpc_options"]["port"]
    http_port = serve_config()["http_options"]["port"]
    assert (grpc_port, http_port) == (9000, 8000)
    for group in cluster["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        assert container["readinessProbe"]["grpc"]["port"] == grpc_port  # grpc.health.v1 through the proxy
        assert container["livenessProbe"]["httpGet"]["port"] == 52365  # the raylet's health, via its agent
        assert {p["containerPort"] for p in container["ports"]} == {http_port, grpc_port}
        assert "startupProbe" not in container  # Pods without a proxy never pass it: it would restart them


def test_every_pod_mounts_the_weights_and_runs_the_same_image():
    cluster = load_rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    model = serve_config()["applications"][0]["args"]["model"]
    images = set()
    for template in templates:
        (container,) = template["spec"]["containers"]
        images.add(container["image"])
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert model.startswith("/models/") and volumes[mounts["/models"]]["persistentVolumeClaim"]["readOnly"]
        assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "latentmoe"
    assert len(images) == 1, images


# ---- serveConfigV2 against Ray Serve ----------------------------------------------------------------------------

def test_serve_config_validates_against_ray_serve_schema():
    config = serve_config()
    schema = ServeDeploySchema.model_validate(config)
    assert unknown_keys(ServeDeploySchema, config) == []
    assert schema.proxy_location.value == "EveryNode"
    (app,) = schema.applications
    assert app.import_path == "latentmoe.actors.serve_app:build_app"
    assert app.args["engine"] == {"dtype": "bfloat16", "device": "cuda"}


@pytest.mark.parametrize("path,misspelt", [((), "proxy_locaton"), (("applications", 0), "import_pth"),
                                           (("grpc_options",), "grpc_servicer_function")])
def test_serve_config_with_a_misspelt_key_fails(path, misspelt):
    config = serve_config()
    node = config
    for key in path:
        node = node[key]
    correct = next(k for k in node if k.startswith(misspelt[:8]))
    node[misspelt] = node.pop(correct)
    try:
        ServeDeploySchema.model_validate(config)
    except pydantic.ValidationError:
        return  # a required key went missing
    assert [k.split(".")[-1] for k in unknown_keys(ServeDeploySchema, config)] == [misspelt]


def test_serve_config_names_an_import_path_that_exists():
    check_import_path()


# ---- plain Kubernetes objects -----------------------------------------------------------------------------------

def test_kubernetes_objects_validate():
    objects = k8s_objects()
    assert {(d["kind"], d["metadata"]["name"]) for _, d in objects} >= {
        ("Service", "latentmoe-http"), ("Service", "latentmoe-grpc"), ("PersistentVolumeClaim", "latentmoe-models")}
    for name, doc in objects:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")


def test_a_misspelt_service_key_fails():
    (doc,) = [d for _, d in k8s_objects() if d["metadata"]["name"] == "latentmoe-grpc"]
    doc["spec"]["ports"][0]["targetport"] = doc["spec"]["ports"][0].pop("targetPort")
    with pytest.raises(kubernetes_validate.ValidationError, match="targetport"):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_services_reach_the_serving_pods_on_the_serve_ports():
    services = {d["metadata"]["name"]: d for _, d in k8s_objects() if d["kind"] == "Service"}
    config = serve_config()
    expected = {"latentmoe-http": config["http_options"]["port"], "latentmoe-grpc": config["grpc_options"]["port"]}
    for name, port in expected.items():
        spec = services[name]["spec"]
        assert spec["selector"] == {"app.kubernetes.io/instance": "latentmoe", "ray.io/serve": "true"}
        assert [(p["port"], p["targetPort"]) for p in spec["ports"]] == [(port, port)]
    assert services["latentmoe-grpc"]["spec"]["ports"][0]["appProtocol"] == "kubernetes.io/h2c"


# ---- the image ----------------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "deploy" / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_builds_on_rays_image_at_the_clusters_ray_version():
    instructions = dockerfile_instructions()
    args = dict(v.split("=", 1) for k, v in instructions if k == "ARG")
    base = next(v for k, v in instructions if k == "FROM").replace("${RAY_IMAGE}", args.get("RAY_IMAGE", ""))
    version = load_rayservice()["spec"]["rayClusterConfig"]["rayVersion"]
    assert base.startswith(f"rayproject/ray:{version}-") and base.endswith("-gpu"), base
    assert version == ray.__version__, "the image, the RayService and this Ray should agree"


def test_dockerfile_copies_the_package_and_no_weights():
    instructions = dockerfile_instructions()
    copies = [v.split()[:-1] for k, v in instructions if k in ("COPY", "ADD")]
    sources = [s for c in copies for s in c if not s.startswith("--")]
    assert sources and all((REPO / s).exists() for s in sources), sources
    assert not any(s.startswith(("/models", "models")) or s.endswith((".safetensors", ".bin")) for s in sources)
    assert not any(k == "ADD" for k, _ in instructions)
    ignore = [line.strip() for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "the build context is the package only: no .venv, no checkpoints"
    assert set(sources) <= {i[1:] for i in ignore if i.startswith("!")}, (sources, ignore)
