"""The Kubernetes manifests in k8s/, validated offline: schemas, overlays and consistency."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mmtalker_platform.serve import ServeConfig
from mmtalker_platform.spec import AnimateJobSpec, TrainJobSpec, load_spec

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
VARIANTS = ["cpu", "gpu"]
Render = Callable[[Path], list[dict[str, Any]]]
Errors = Callable[[dict[str, Any]], list[str]]


def _jobs() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted((K8S / "jobs").glob("*.yaml"))]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_overlays_render_to_valid_resources(variant: str, render: Render, errors: Errors) -> None:
    docs = render(K8S / "overlays" / variant)
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "RayService", "Deployment", "StatefulSet", "Service"} <= kinds
    problems = [line for doc in docs + _jobs() for line in errors(doc)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("variant", VARIANTS)
def test_our_rendering_equals_kubectl_kustomize(
    variant: str, render: Render, kubectl_render: Render | None
) -> None:
    if kubectl_render is None:
        pytest.skip("kubectl is not installed; the Python rendering is validated alone")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    ours = sorted(render(K8S / "overlays" / variant), key=key)
    assert ours == sorted(kubectl_render(K8S / "overlays" / variant), key=key)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["spec", "workerGroupSpecs", 0, "replicas"], "two", "'two' is not of type 'integer'"),
        (["spec", "headGroupSpec", "rayStartParam"], {}, "'rayStartParam' was unexpected"),
        (["spec", "autoscalerOptions", "version"], "v3", "'v3' is not one of ['v1', 'v2']"),
    ],
)
def test_a_broken_kuberay_resource_fails_clearly(
    render: Render, errors: Errors, path: list[Any], value: Any, message: str
) -> None:
    cluster = copy.deepcopy(_find(render(K8S / "overlays" / "cpu"), "RayCluster", "mmtalker"))
    node = cluster
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    problems = errors(cluster)
    assert any(message in line for line in problems), problems
    assert all(line.startswith("RayCluster/mmtalker: ") for line in problems)


def test_a_broken_core_resource_fails_clearly(render: Render, errors: Errors) -> None:
    deployment = copy.deepcopy(_find(render(K8S / "overlays" / "cpu"), "Deployment", "mlflow"))
    deployment["spec"]["replicas"] = "one"
    assert any("replicas" in line for line in errors(deployment))
    deployment["spec"]["replicas"] = 1
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert any("imagePullPolicyy" in line for line in errors(deployment))


@pytest.mark.parametrize("variant", VARIANTS)
def test_versions_images_and_secrets_agree(
    variant: str, render: Render, consistency: Callable[..., list[str]]
) -> None:
    docs = render(K8S / "overlays" / variant)
    assert consistency(docs, variant) == []
    broken = copy.deepcopy(docs)
    _find(broken, "RayCluster", "mmtalker")["spec"]["rayVersion"] = "2.59.0"
    env = _find(broken, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "AWS_SECRET_ACCESS_KEY", "value": "inline"})
    problems = consistency(broken, variant)
    assert "RayCluster/mmtalker: rayVersion 2.59.0 != ray[train,data,serve]==2.60.0" in "\n".join(
        problems
    )
    assert any("AWS_SECRET_ACCESS_KEY has a literal value" in p for p in problems)
    other = "gpu" if variant == "cpu" else "cpu"
    assert any(f"is not tagged 0.1.0-{other}" in p for p in consistency(docs, other))


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayjobs_run_job_specs_the_cluster_mounts(
    variant: str, render: Render, tmp_path: Path
) -> None:
    docs = render(K8S / "overlays" / variant)
    specs = _find(docs, "ConfigMap", "mmtalker-jobs")["data"]
    for job in _jobs():
        cluster = _find(docs, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
        head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
        mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v.get("configMap", {}).get("name") for v in head["volumes"]}
        match = re.fullmatch(r"mmtalker run (/\S+)/([\w.-]+\.yaml)", job["spec"]["entrypoint"])
        assert match, f"{job['metadata']['name']}: entrypoint must be `mmtalker run SPEC`"
        folder, file = match.groups()
        assert volumes[mounts[folder]] == "mmtalker-jobs" and file in specs
        (tmp_path / file).write_text(specs[file])
        spec = load_spec(tmp_path / file)
        assert job["metadata"]["name"] == spec.name
        if isinstance(spec, TrainJobSpec):
            # Multi-node training needs shared storage for data and checkpoints.
            assert spec.data.startswith("s3://") and (spec.checkpoint.storage or "").startswith(
                "s3://"
            )
            assert spec.scaling.use_gpu == (variant == "gpu")
        else:
            assert isinstance(spec, AnimateJobSpec)
            assert spec.catalog.startswith("s3://") and spec.output.startswith("s3://")


def test_the_rayservice_serves_the_application_of_jobs_serve_yaml(render: Render) -> None:
    service = _find(render(K8S / "overlays" / "cpu"), "RayService", "mmtalker-serve")
    deployed = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert deployed == yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())["applications"]
    ServeConfig.model_validate(deployed[0]["args"])


def _jobs_api_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Why the RayService's replicas could not reach their own cluster's Jobs API, if they could
    not: an address pinned to loopback, or a head dashboard other pods cannot reach."""
    service = _find(docs, "RayService", "mmtalker-serve")
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    cluster = service["spec"]["rayClusterConfig"]
    configmaps = {
        d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"
    }
    problems = []
    if cluster["headGroupSpec"]["rayStartParams"].get("dashboard-host") != "0.0.0.0":
        problems.append("head dashboard-host is not 0.0.0.0: replicas on workers cannot reach it")
    addresses = {"args.jobs_address": ServeConfig.model_validate(application["args"]).jobs_address}
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for container in (c for g in groups for c in g["template"]["spec"]["containers"]):
        env = {}
        for source in container.get("envFrom", []):
            env.update(configmaps.get(source.get("configMapRef", {}).get("name"), {}))
        env.update({e["name"]: e.get("value") for e in container.get("env", [])})
        for name in ("MMTALKER_RAY_DASHBOARD", "RAY_API_SERVER_ADDRESS"):
            addresses[f"{container['name']} {name}"] = env.get(name)
    for where, address in addresses.items():
        if address and re.search(r"(^|//)(127\.|localhost|\[?::1\]?)", address):
            problems.append(f"{where} = {address} points the replicas at themselves")
    return problems


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_reaches_the_jobs_api_of_its_own_cluster(variant: str, render: Render) -> None:
    docs = render(K8S / "overlays" / variant)
    assert _jobs_api_problems(docs) == []
    broken = copy.deepcopy(docs)
    _find(broken, "ConfigMap", "mmtalker-env")["data"]["MMTALKER_RAY_DASHBOARD"] = (
        "http://127.0.0.1:8265"
    )
    service = _find(broken, "RayService", "mmtalker-serve")["spec"]["rayClusterConfig"]
    service["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "127.0.0.1"
    problems = _jobs_api_problems(broken)
    assert any("head dashboard-host" in p for p in problems)
    assert any("ray-worker MMTALKER_RAY_DASHBOARD = http://127.0.0.1:8265" in p for p in problems)


def test_the_tracking_uri_names_the_mlflow_service(render: Render) -> None:
    docs = render(K8S / "overlays" / "cpu")
    uri = _find(docs, "ConfigMap", "mmtalker-env")["data"]["MLFLOW_TRACKING_URI"]
    service = _find(docs, "Service", "mlflow")
    host = f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert uri == f"http://{host}"
    # MLflow 3 refuses requests whose Host header it does not allow (403), /health excepted.
    env = _find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["env"]
    allowed = next(e["value"] for e in env if e["name"] == "MLFLOW_SERVER_ALLOWED_HOSTS")
    assert host in allowed.split(",") and "localhost:*" in allowed.split(",")


def test_every_referenced_secret_is_documented(render: Render) -> None:
    docs = render(K8S / "overlays" / "gpu")
    text = yaml.safe_dump(docs)
    names = set(re.findall(r"secretRef:\s+name: ([\w-]+)", text))
    names |= set(re.findall(r"secretKeyRef:\s+key: \w+\s+name: ([\w-]+)", text))
    readme = (ROOT / "README.md").read_text()
    assert names == {"mmtalker-s3", "mmtalker-postgres", "mmtalker-serve"}
    assert all(f"kubectl create secret generic {name}" in readme for name in names)
