"""The Kubernetes manifests of deploy/k8s as the cluster would get them: rendered by `kubectl kustomize`."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

K8S = REPO / "deploy" / "k8s"
# Every kustomization an operator applies (deploy/README.md).
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu", "overlays/fleet", "fleet-database", "kserve", "train/base",
                  "train/indexed-job", "train/pytorchjob", "tools")
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"

Object = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl")
    assert found, "kubectl (with its built-in kustomize) must be on PATH to render deploy/k8s"
    return found


@functools.cache
def _rendered(kustomization: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {kustomization}: {result.stderr}"
    return result.stdout


def render(kustomization: str) -> list[Object]:
    """The objects of one kustomization, as `kubectl apply -k` would send them (fresh copies)."""
    return [document for document in yaml.safe_load_all(_rendered(kustomization)) if document]


def find(objects: list[Object], kind: str, name: str | None = None) -> Object:
    """The one object of `kind` (and `name`)."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec(workload: Object) -> Object:
    """The pod spec of a Pod, or the pod template's of a Deployment, Job, CronJob or the master of a PyTorchJob."""
    spec = workload["spec"]
    if workload["kind"] == "Pod":
        return dict(spec)
    if workload["kind"] == "PyTorchJob":
        return dict(spec["pytorchReplicaSpecs"]["Master"]["template"]["spec"])
    if workload["kind"] == "CronJob":
        return dict(spec["jobTemplate"]["spec"]["template"]["spec"])
    return dict(spec["template"]["spec"])


def adapter_rules() -> list[Object]:
    """prometheus-adapter's custom metric rules (deploy/k8s/prometheus-adapter/values.yaml)."""
    return list(yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"])


def adapter_expressions() -> list[str]:
    """The adapter's PromQL, with its templates filled in the way the adapter fills them."""
    filled = []
    for rule in adapter_rules():
        for query in (rule["seriesQuery"], rule["metricsQuery"]):
            filled.append(query.replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
                          .replace("{<<.LabelMatchers>>}", '{namespace="valley",pod=~"valley-serve-.*"}')
                          .replace("<<.LabelMatchers>>", 'namespace="valley"').replace("<<.GroupBy>>", "pod"))
    return filled


def crd_schema(api_version: str, kind: str) -> Path:
    """Where the vendored openAPIV3Schema of a custom resource kind lies (deploy/k8s/crds/README.md)."""
    group, version = api_version.split("/")
    return K8S / "crds" / f"{group}_{kind.lower()}_{version}.json"

