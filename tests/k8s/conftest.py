"""Offline Kubernetes tooling for the manifest tests: kustomize rendering and schema validation.

Nothing here talks to a cluster. Overlays render with ``kubectl kustomize`` where kubectl is
installed and with :func:`render_overlay` (the kustomize features k8s/ uses) everywhere; the test
compares the two where both exist. KubeRay resources are checked against the v1 schemas of the
KubeRay v1.7.0 CRDs in tests/k8s/kuberay-crds (see its README) with unknown fields rejected,
core kinds with kubernetes-validate.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRDS = Path(__file__).resolve().parent / "kuberay-crds"
KUBERNETES_VERSION = "1.32"
Document = dict[str, Any]


def load_documents(path: Path) -> list[Document]:
    """The non-empty YAML documents of a file."""
    # libyaml: the KubeRay CRDs are 3 MB of YAML, which the pure-Python loader takes 9 s to read.
    return [doc for doc in yaml.load_all(path.read_text("utf-8"), Loader=yaml.CSafeLoader) if doc]


def render_overlay(folder: Path) -> list[Document]:
    """Render a kustomization: resources, namespace, JSON 6902 patches, then image overrides."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text("utf-8"))
    unknown = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "images",
                                    "patches"}  # fmt: skip
    if unknown:
        raise ValueError(f"{folder}/kustomization.yaml uses {sorted(unknown)}, not rendered here")
    docs: list[Document] = []
    for resource in kustomization.get("resources", []):
        path = folder / resource
        docs += render_overlay(path) if path.is_dir() else load_documents(path)
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [d for d in docs if d["kind"] == target["kind"]
                   and d["metadata"]["name"] == target["name"]]  # fmt: skip
        if not matches:
            raise ValueError(f"patch target {target} matches no resource in {folder}")
        for doc in matches:
            patched = jsonpatch.apply_patch(doc, yaml.safe_load(patch["patch"]))
            doc.clear()
            doc.update(patched)
    if "namespace" in kustomization:
        for doc in docs:
            if doc["kind"] != "Namespace":
                doc["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        replacement = f"{image.get('newName', image['name'])}:{image['newTag']}"
        for container in containers(docs):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = replacement
    return docs


def containers(node: Any) -> list[Document]:
    """Every container spec (``containers``/``initContainers`` entries) anywhere in ``node``."""
    found: list[Document] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                found += value
            else:
                found += containers(value)
    elif isinstance(node, list):
        for item in node:
            found += containers(item)
    return found


def closed_schema(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever it lists properties and says
    nothing about others, so a misspelt field fails instead of being ignored."""
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        closed["additionalProperties"] = False
    return closed


def _crd_validators() -> dict[str, jsonschema.protocols.Validator]:
    validators = {}
    for path in sorted(CRDS.glob("ray.io_*.yaml")):
        crd = load_documents(path)[0]
        version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schema = closed_schema(version["schema"]["openAPIV3Schema"])
        validators[crd["spec"]["names"]["kind"]] = jsonschema.Draft7Validator(schema)
    return validators


def validation_errors(doc: Document, crds: dict[str, jsonschema.protocols.Validator]) -> list[str]:
    """Every schema violation of one resource, each as ``Kind/name: path: message``."""
    name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    if doc.get("apiVersion") == "ray.io/v1":
        if doc["kind"] not in crds:
            return [f"{name}: no KubeRay CRD for kind {doc['kind']!r}"]
        return [
            f"{name}: {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in crds[doc["kind"]].iter_errors(copy.deepcopy(doc))
        ]
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(map(str, error.path)) or "(root)"
        return [f"{name}: {path}: {error.message}"]
    return []


def consistency_problems(docs: list[Document], variant: str) -> list[str]:
    """Disagreements between rendered manifests (one overlay) and the rest of the project."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    dockerfile = (ROOT / "platform" / "docker" / "Dockerfile").read_text("utf-8")
    ray = next(d for d in pyproject["project"]["dependencies"] if d.startswith("ray["))
    ray_version = ray.split("==")[1]
    minor = re.search(r">=3\.(\d+)", pyproject["project"]["requires-python"])
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    problems = []
    if args.get("RAY_VERSION") != ray_version:
        problems.append(f"Dockerfile RAY_VERSION {args.get('RAY_VERSION')} != {ray} in pyproject")
    if minor is None or args.get("PYTHON") != f"py3{minor[1]}":
        problems.append(f"Dockerfile PYTHON {args.get('PYTHON')} does not match requires-python")
    by_kind: dict[str, dict[str, Document]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
    clusters = {
        **{f"RayCluster/{n}": d["spec"] for n, d in by_kind.get("RayCluster", {}).items()},
        **{f"RayService/{n}": d["spec"]["rayClusterConfig"]
           for n, d in by_kind.get("RayService", {}).items()},
    }  # fmt: skip
    for name, spec in clusters.items():
        if spec.get("rayVersion") != ray_version:
            problems.append(f"{name}: rayVersion {spec.get('rayVersion')} != {ray} in pyproject")
        if spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
            problems.append(f'{name}: the head must not schedule work (num-cpus: "0")')
    image = f"{pyproject['project']['version']}-{variant}"
    for container in containers(docs):
        if "mmtalker" in container["image"] and not container["image"].endswith(f":{image}"):
            problems.append(f"container {container['name']}: image {container['image']} is not "
                            f"tagged {image} (project version and variant)")  # fmt: skip
    problems += _secret_problems(docs)
    return problems


def _secret_problems(docs: list[Document]) -> list[str]:
    problems = [f"Secret/{d['metadata']['name']} is inlined in the manifests"
                for d in docs if d["kind"] == "Secret"]  # fmt: skip
    for container in containers(docs):
        for env in container.get("env", []):
            sensitive = re.search(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY", env["name"])
            if sensitive and "valueFrom" not in env:
                problems.append(f"container {container['name']}: {env['name']} has a literal "
                                "value; reference a Secret")  # fmt: skip
    return problems


@pytest.fixture(scope="session")
def crds() -> dict[str, jsonschema.protocols.Validator]:
    """Validators of RayCluster, RayJob and RayService (v1), unknown fields rejected."""
    return _crd_validators()


@pytest.fixture(scope="session")
def kubectl_render() -> Callable[[Path], list[Document]] | None:
    """``kubectl kustomize`` as a function, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None

    def render(folder: Path) -> list[Document]:
        output = subprocess.run(
            [kubectl, "kustomize", str(folder)], capture_output=True, text=True, check=True
        ).stdout
        return [doc for doc in yaml.safe_load_all(output) if doc]

    return render


@pytest.fixture(scope="session")
def render() -> Callable[[Path], list[Document]]:
    """:func:`render_overlay`."""
    return render_overlay


@pytest.fixture(scope="session")
def errors(
    crds: dict[str, jsonschema.protocols.Validator],
) -> Callable[[Document], list[str]]:
    """Schema violations of one resource (KubeRay CRD or core kind), one line each."""
    return lambda doc: validation_errors(doc, crds)


@pytest.fixture(scope="session")
def consistency() -> Callable[[list[Document], str], list[str]]:
    """:func:`consistency_problems`."""
    return consistency_problems
