"""The deployment files under deploy/: every manifest against its schema (offline), the app that each
RayService's serveConfigV2 builds from its own arguments, how the manifests fit together, and an image
installed by `make setup` alone. Nothing here starts Ray, Kubernetes or Docker."""

from __future__ import annotations

import json
import re
from functools import cache
from importlib.resources import files
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
SCHEMAS = DEPLOY / "schemas"
MONITORING = DEPLOY / "monitoring"
RAYSERVICES = sorted((DEPLOY / "kuberay").glob("rayservice-*.yaml"))
# An older Kubernetes still in wide use, and the newest whose schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.28", "1.37")
K8S_DEFINITIONS = "https://kubernetes.io/api/_definitions.json"
CUSTOM_SCHEMAS = {
    ("ray.io/v1", "RayService"): "rayservice.ray.io_v1.schema.yaml",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.monitoring.coreos.com_v1.schema.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.monitoring.coreos.com_v1.schema.yaml",
}
# YAML files that are not Kubernetes objects, each checked by a test of its own below.
OTHER_YAML = {MONITORING / "prometheus.yaml", MONITORING / "aptserve-rules.yaml", MONITORING / "kustomization.yaml"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def manifests() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml") if SCHEMAS not in p.parents and p not in OTHER_YAML)


@cache
def k8s_definitions(version: str) -> dict:
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}.0-local-strict"
    return json.loads((folder / "_definitions.json").read_text())


def validator(schema_file: str, version: str) -> jsonschema.Draft202012Validator:
    """A validator for one of our schemas, its `$ref`s to Kubernetes types resolved for `version`."""
    schema = load(SCHEMAS / schema_file)
    jsonschema.Draft202012Validator.check_schema(schema)
    registry = Registry().with_resource(K8S_DEFINITIONS, Resource.from_contents(k8s_definitions(version)))
    return jsonschema.Draft202012Validator(schema, registry=registry)


def errors(obj: dict, version: str) -> list[str]:
    """Every way `obj` breaks its schema (an empty list if none)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    if key in CUSTOM_SCHEMAS:
        found = validator(CUSTOM_SCHEMAS[key], version).iter_errors(obj)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in found]
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'.'.join(map(str, err.path))}: {err.message}"]
    return []


def serve_config(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def pod_templates(rayservice: dict) -> dict[str, dict]:
    """'head' and each worker group's name → its pod template."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = {g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])}
    return {"head": cluster["headGroupSpec"]["template"], **groups}


def gpus(template: dict) -> int:
    return sum(int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
               for c in template["spec"]["containers"])


# -- schemas ---------------------------------------------------------------------------------------


def test_manifests_are_found() -> None:
    kinds = {load(p)["kind"] for p in manifests()}
    assert {"RayService", "PodMonitor", "PrometheusRule", "PersistentVolumeClaim"} <= kinds
    assert len(RAYSERVICES) >= 2


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifests(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_manifest_matches_its_schema(path: Path, version: str) -> None:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert documents, f"{path} holds no object"
    for obj in documents:
        assert not errors(obj, version), f"{path.name} ({obj['kind']}, Kubernetes {version}): {errors(obj, version)}"


def _set(obj: dict, dotted: str, value: object) -> dict:
    """A deep copy of `obj` with one value replaced (list indexes are numbers in the path)."""
    copy = json.loads(json.dumps(obj))
    *parents, leaf = dotted.split(".")
    node = copy
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[int(leaf) if isinstance(node, list) else leaf] = value
    return copy


@pytest.mark.parametrize(
    ("path", "dotted", "value", "complaint"),
    [
        # Ray reads start parameters as strings: an unquoted number is refused by the CRD.
        ("kuberay/rayservice-small.yaml", "spec.rayClusterConfig.headGroupSpec.rayStartParams.num-cpus", 0,
         "is not of type 'string'"),
        ("kuberay/rayservice-small.yaml", "spec.rayClusterConfig.workerGroupSpecs.0.replica", 2, "replica"),
        ("kuberay/rayservice-small.yaml", "spec.rayClusterConfig.workerGroupSpecs.0.template.spec.containers.0.gpu",
         1, "gpu"),
        ("kuberay/rayservice-opt66b.yaml", "spec.serveConfigV2", {"applications": []}, "is not of type 'string'"),
        ("kuberay/model-pvc-opt66b.yaml", "spec.accessModes", "ReadOnlyMany", "is not of type 'array'"),
        ("monitoring/podmonitor.yaml", "spec.podMetricsEndpoints.0.interval", "15 seconds", "does not match"),
        ("monitoring/podmonitor.yaml", "spec.podMetricEndpoints", [], "podMetricEndpoints"),
        ("monitoring/prometheusrule.yaml", "spec.groups.0.rules.0.expr", None, "None"),
    ],
)
def test_schemas_refuse_broken_manifests(path: str, dotted: str, value: object, complaint: str) -> None:
    broken = _set(load(DEPLOY / path), dotted, value)
    found = errors(broken, K8S_VERSIONS[-1])
    assert found and any(complaint in e for e in found), found


def test_rule_file_and_prometheus_config_match_their_schemas() -> None:
    rules = validator(CUSTOM_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")], K8S_VERSIONS[-1])
    spec = {"$ref": "urn:aptserve:schema:prometheusrule.monitoring.coreos.com:v1#/$defs/PrometheusRuleSpec"}
    rule_file = rules.evolve(schema=spec)
    assert not [e.message for e in rule_file.iter_errors(load(MONITORING / "aptserve-rules.yaml"))]
    assert list(rule_file.iter_errors({"groups": [{"name": "x", "rules": [{"alert": "A"}]}]})), "expr is required"
    config = validator("prometheus-config.schema.yaml", K8S_VERSIONS[-1])
    assert not [e.message for e in config.iter_errors(load(MONITORING / "prometheus.yaml"))]
    assert list(config.iter_errors({"scrape_configs": [{"job_name": "x", "metric_path": "/metrics"}]}))


def test_prometheusrule_carries_the_rule_file() -> None:
    assert load(MONITORING / "prometheusrule.yaml")["spec"] == load(MONITORING / "aptserve-rules.yaml")


def test_kustomization_generates_a_valid_dashboard_configmap() -> None:
    kustomization = load(MONITORING / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (MONITORING / resource).is_file(), resource
    for generator in kustomization["configMapGenerator"]:
        data = {name: (MONITORING / name).read_text() for name in generator["files"]}
        configmap = {"apiVersion": "v1", "kind": "ConfigMap", "data": data,
                     "metadata": {"name": generator["name"], "labels": generator["options"]["labels"]}}
        for version in K8S_VERSIONS:
            assert not errors(configmap, version)
        # `kubectl apply` keeps the whole object in an annotation of at most 256 KiB.
        assert len(json.dumps(configmap)) < 200_000
    assert "grafana-dashboard.json" in kustomization["configMapGenerator"][0]["files"]


# -- serveConfigV2 and the app it builds -------------------------------------------------------------


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_serve_config_is_valid_for_ray_serve(path: Path) -> None:
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    from cluster import serve_app

    config = serve_config(load(path))
    ServeDeploySchema.model_validate(config)
    # Serve ignores unknown keys (for forward compatibility): a misspelt one would silently do nothing.
    assert set(config) <= set(ServeDeploySchema.model_fields)
    assert config["http_options"]["host"] == "0.0.0.0", "pods must accept connections from the Service"
    assert config["grpc_options"]["grpc_servicer_functions"] == [serve_app.GRPC_SERVICER]
    [app] = config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "cluster.serve_app:app_builder"
    assert (app["name"], app["route_prefix"]) == (serve_app.APP_NAME, "/")
    # Serve's proxies hold the HTTP and gRPC ports on every pod: an ingress listening itself would collide.
    assert config["proxy_location"] != "Disabled" and app["args"]["set"]["server.ingress"] == "proxy"


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_app_builder_builds_the_manifests_application(path: Path) -> None:
    """Serve's own loading path (import the import_path, call it with the args); it binds, starts nothing."""
    import ray
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from cluster.config import AptServeConfig

    app_config = serve_config(load(path))["applications"][0]
    args = app_config["args"]
    app = call_user_app_builder_with_args_if_necessary(import_attr(app_config["import_path"]), args)
    assert isinstance(app, serve.Application)
    config = AptServeConfig.model_validate(app._bound_deployment.init_args[0])
    assert config.model.path == args["model"]
    assert config.parallel.tensor_parallel_size == args["tensor_parallel_size"]
    assert config.parallel.replicas == args["replicas"]
    assert (config.scheduler.policy, config.scheduler.cache_mode) == (args["policy"], args["cache_mode"])
    assert (config.scheduler.ttft_slo_s, config.scheduler.tbt_slo_s) == (args["ttft_slo_s"], args["tbt_slo_s"])
    assert config.cache.memory_bytes == args["memory_bytes"]
    # On GPUs only the ray executor's worker actors reserve a GPU (the scheduler actor reserves nothing).
    assert (config.parallel.executor, config.model.device) == ("ray", "cuda")
    assert not ray.is_initialized()


def test_66b_manifest_is_tp8_on_one_node() -> None:
    rayservice = load(DEPLOY / "kuberay" / "rayservice-opt66b.yaml")
    args = serve_config(rayservice)["applications"][0]["args"]
    assert args["tensor_parallel_size"] == 8
    [group] = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert group.get("numOfHosts", 1) == 1 and gpus(group["template"]) == 8
    overrides = args["set"]
    assert overrides["parallel.collective_timeout_s"] > 30 and overrides["parallel.step_timeout_s"] > 300


# -- how the pieces fit -----------------------------------------------------------------------------


def _pin(package: str) -> str:
    return re.search(rf'"{re.escape(package)}(?:\[[^]]*\])?==([^"]+)"', (REPO / "pyproject.toml").read_text())[1]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_rayservice_fits_its_gpus_volumes_and_image(path: Path) -> None:
    rayservice = load(path)
    args = serve_config(rayservice)["applications"][0]["args"]
    assert rayservice["spec"]["rayClusterConfig"]["rayVersion"] == _pin("ray")
    templates = pod_templates(rayservice)
    assert gpus(templates.pop("head")) == 0, "the head runs no rank"
    # Every engine replica needs its TP ranks' GPUs inside one pod (the ranks meet through a local file).
    groups = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    groups_per_pod = [gpus(g["template"]) // args["tensor_parallel_size"] for g in groups]
    assert sum(n * g["replicas"] for n, g in zip(groups_per_pod, groups)) >= args["replicas"]
    assert all(gpus(g["template"]) % args["tensor_parallel_size"] == 0 for g in groups)
    # Every pod may host the ingress or a scheduler actor, which read the model's config and tokenizer.
    for name, template in pod_templates(rayservice).items():
        [container] = template["spec"]["containers"]
        assert container["image"].split(":")[-1].startswith(_version()), name
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        in_image = args["model"].startswith("/app/")
        assert in_image or any(args["model"].startswith(m.rstrip("/") + "/") for m in mounts), name
        assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"], name


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_every_pod_reads_the_api_key_from_the_secret(path: Path) -> None:
    """Any pod may host an ingress replica, which asks the key from APTSERVE_API_KEY (cluster/config.py)."""
    from cluster.config import API_KEY_ENV

    for name, template in pod_templates(load(path)).items():
        [container] = template["spec"]["containers"]
        [entry] = [e for e in container["env"] if e["name"] == API_KEY_ENV]
        assert entry["valueFrom"]["secretKeyRef"] == {"name": "aptserve-api-key", "key": "api-key"}, name
        assert "value" not in entry, name  # never a key in the manifest itself
    assert "aptserve-api-key" in (REPO / "docs" / "DEPLOY.md").read_text()


def _version() -> str:
    return re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]


def _head_and_worker_labels(rayservice: dict) -> tuple[dict, list[dict]]:
    """The labels of the pods KubeRay makes: the template's, plus its node-type label."""
    templates = pod_templates(rayservice)
    head = templates.pop("head")["metadata"]["labels"] | {"ray.io/node-type": "head"}
    return head, [t["metadata"]["labels"] | {"ray.io/node-type": "worker"} for t in templates.values()]


@pytest.mark.parametrize("path", RAYSERVICES, ids=lambda p: p.name)
def test_monitoring_scrapes_exactly_the_head_serve_port(path: Path) -> None:
    rayservice = load(path)
    head_labels, worker_labels = _head_and_worker_labels(rayservice)
    http_port = serve_config(rayservice)["http_options"]["port"]
    head_ports = {p["name"]: p["containerPort"] for p in pod_templates(rayservice)["head"]["spec"]["containers"][0]
                  ["ports"]}

    podmonitor = load(MONITORING / "podmonitor.yaml")["spec"]
    wanted = podmonitor["selector"]["matchLabels"]
    assert wanted.items() <= head_labels.items()
    assert not any(wanted.items() <= labels.items() for labels in worker_labels), "workers would double count"
    [endpoint] = podmonitor["podMetricsEndpoints"]
    assert head_ports[endpoint["port"]] == http_port and endpoint["path"] == "/metrics"

    scrape = load(MONITORING / "prometheus.yaml")["scrape_configs"][0]
    keeps = {r["source_labels"][0]: r["regex"] for r in scrape["relabel_configs"] if r.get("action") == "keep"}
    pod_label = "__meta_kubernetes_pod_label_"
    as_meta = {pod_label + re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in head_labels.items()}
    for label, regex in keeps.items():
        if label.startswith(pod_label):
            assert re.fullmatch(regex, as_meta.get(label, "")), label
    assert head_ports[keeps["__meta_kubernetes_pod_container_port_name"]] == http_port
    assert scrape["metrics_path"] == "/metrics"


# -- the image ---------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    instructions, current = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            instructions.append(current.strip())
            current = ""
    return instructions


def test_dockerfile_installs_only_through_make_setup() -> None:
    runs = [i for i in dockerfile_instructions() if i.startswith("RUN ")]
    assert any(re.search(r"\bmake setup\b", run) for run in runs), "the image must be set up by `make setup`"
    installer = re.compile(r"\bpip3?\s+install\b|-m\s+pip\b|\buv\s+(pip|sync|add)\b|\bconda\s+install\b|\bpoetry\b")
    assert not [run for run in runs if installer.search(run)], "packages are installed by `make setup` only"
    # ...and `make setup` is where the project's installs live.
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:", makefile, re.M) and "pip install" in makefile


def test_image_layout_matches_the_manifests() -> None:
    instructions = dockerfile_instructions()
    [workdir] = [i.split()[1] for i in instructions if i.startswith("WORKDIR ")]
    makefile = (REPO / "Makefile").read_text()
    venv = re.search(r"^VENV := (\S+)", makefile, re.M)[1]
    model_dir = re.search(r"^MODEL_DIR := (\S+)", makefile, re.M)[1]
    env = " ".join(i for i in instructions if i.startswith("ENV "))
    assert f"PATH={workdir}/{venv}/bin:" in env and "HF_HUB_OFFLINE=1" in env
    small = serve_config(load(DEPLOY / "kuberay" / "rayservice-small.yaml"))["applications"][0]["args"]
    assert small["model"] == f"{workdir}/{model_dir}", "the small deployment serves the model `make setup` built"
    # The image builds its own venv and model; the developer's must not be copied in.
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {venv, "data", ".git"} <= set(ignored)
