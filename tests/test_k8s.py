"""deploy/k8s checked offline: every kustomization renders, validates strictly, and agrees with the server.

Core kinds are validated by kubernetes-validate in strict mode (unknown fields fail) against the
oldest Kubernetes the manifests support and the newest it knows. ServiceMonitor, PrometheusRule
and ServingRuntime are validated against their CRDs' openAPIV3Schema, vendored in
deploy/k8s/crds, with unknown fields refused as the API server's strict field validation refuses
them. InferenceService and PyTorchJob, whose CRDs repeat whole pod specs (1 MB and 0.6 MB), get a
structural check instead: their own fields against the lists below, every embedded pod spec,
pod template and container against Kubernetes' own schema. A kind with none of these fails.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.cli import parse_settings
from service.control.recalibrate_job import build_parser as recalibrate_parser
from service.control.reload import build_parser as reload_parser
from service.server import LIVENESS_SERVICE
from service.settings import Settings
from tests.conftest import REPO
from tests.kube import (
    K8S,
    KUSTOMIZATIONS,
    Object,
    adapter_expressions,
    adapter_rules,
    crd_schema,
    find,
    pod_spec,
    render,
)
from training.cli import build_parser

# grpc probes are GA from 1.27, PodDisruptionBudget.unhealthyPodEvictionPolicy from 1.31 (beta, on, from 1.27).
OLDEST_KUBERNETES = "1.29.0"
KUBERNETES_VERSIONS = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SERVE_OVERLAYS = ("overlays/cpu", "overlays/gpu", "overlays/fleet")


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever Kubernetes would refuse them (not where it preserves them)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


# The fields KServe adds around a pod spec and a container (serving.kserve.io/v1beta1, KServe 0.11-0.15).
KSERVE_COMPONENT = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType",
                    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
                    "annotations", "deploymentStrategy", "autoScaling", "workerSpec"}
KSERVE_MODEL = {"modelFormat", "runtime", "runtimeVersion", "protocolVersion", "storageUri", "storage"}
KSERVE_PROTOCOLS = {"v1", "v2", "grpc-v1", "grpc-v2"}
# kubeflow.org/v1 PyTorchJob (training-operator 1.7-1.9).
PYTORCHJOB_SPEC = {"runPolicy", "elasticPolicy", "pytorchReplicaSpecs", "nprocPerNode"}
PYTORCHJOB_RUN_POLICY = {"cleanPodPolicy", "ttlSecondsAfterFinished", "activeDeadlineSeconds", "backoffLimit",
                         "schedulingPolicy", "suspend", "managedBy"}
PYTORCHJOB_REPLICA = {"replicas", "template", "restartPolicy"}


def _core(document: Object) -> None:
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(copy.deepcopy(document), version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            raise AssertionError(f"no schema for {document['apiVersion']} {document['kind']}: an unknown kind "
                                 "(vendor its CRD schema in deploy/k8s/crds)") from None


def _only(fields: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(fields) - allowed
    if unknown:
        raise jsonschema.ValidationError(f"{where}: unknown fields {sorted(unknown)}")


def _pod(spec: Object) -> Object:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}


def _inference_service(document: Object) -> None:
    _only(document, {"apiVersion", "kind", "metadata", "spec"}, "InferenceService")
    _only(document["spec"], {"predictor", "transformer", "explainer"}, "spec")
    predictor = dict(document["spec"]["predictor"])
    model = predictor.pop("model")
    container = {key: value for key, value in model.items() if key not in KSERVE_MODEL}
    if model.get("protocolVersion") not in KSERVE_PROTOCOLS | {None}:
        raise jsonschema.ValidationError(f"model.protocolVersion: {model['protocolVersion']!r} not in "
                                         f"{sorted(KSERVE_PROTOCOLS)}")
    if not isinstance(model.get("modelFormat", {}).get("name"), str):
        raise jsonschema.ValidationError("model.modelFormat.name: required")
    pod = {key: value for key, value in predictor.items() if key not in KSERVE_COMPONENT}
    _core(_pod({**pod, "containers": [{"name": "kserve-container", **container}]}))


def _pytorchjob(document: Object) -> None:
    _only(document, {"apiVersion", "kind", "metadata", "spec"}, "PyTorchJob")
    spec = document["spec"]
    _only(spec, PYTORCHJOB_SPEC, "spec")
    _only(spec.get("runPolicy", {}), PYTORCHJOB_RUN_POLICY, "spec.runPolicy")
    _only(spec["pytorchReplicaSpecs"], {"Master", "Worker"}, "spec.pytorchReplicaSpecs")
    for role, replica in spec["pytorchReplicaSpecs"].items():
        _only(replica, PYTORCHJOB_REPLICA, role)
        if replica.get("restartPolicy", "Never") not in ("Always", "OnFailure", "Never", "ExitCode"):
            raise jsonschema.ValidationError(f"{role}.restartPolicy: {replica['restartPolicy']!r}")
        _core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
               "template": replica["template"]})


STRUCTURAL_CHECKS = {("serving.kserve.io/v1beta1", "InferenceService"): _inference_service,
                     ("kubeflow.org/v1", "PyTorchJob"): _pytorchjob}


def validate_object(document: Object) -> None:
    """Raise unless `document` is a valid object of a kind we have a schema for."""
    metadata = document.get("metadata", {})
    assert DNS_LABEL.fullmatch(metadata.get("name", "")), f"{document.get('kind')}: bad name {metadata.get('name')!r}"
    structural = STRUCTURAL_CHECKS.get((document["apiVersion"], document["kind"]))
    if structural is not None:
        structural(document)
        return
    schema_file = crd_schema(document["apiVersion"], document["kind"]) if "/" in document["apiVersion"] else None
    if schema_file is not None and schema_file.is_file():
        schema = _strict(json.loads(schema_file.read_text()))
        body = {key: value for key, value in document.items() if key != "metadata"}
        schema["properties"].pop("metadata", None)
        schema["required"] = [field for field in schema.get("required", []) if field != "metadata"]
        jsonschema.Draft7Validator(schema).validate(body)
        return
    _core(document)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kustomization_renders_and_every_object_validates(kustomization: str) -> None:
    objects = render(kustomization)
    assert objects
    for document in objects:
        try:
            validate_object(document)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as error:
            raise AssertionError(f"{kustomization}: {document['kind']} {document['metadata']['name']}: "
                                 f"{error.message} at {list(error.path)}") from None


def test_the_validation_refuses_unknown_kinds_and_fields() -> None:
    with pytest.raises(AssertionError, match="unknown kind"):
        validate_object({"apiVersion": "example.com/v1", "kind": "Gadget", "metadata": {"name": "g"}})
    deployment = find(render("overlays/cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(deployment)
    monitor = find(render("overlays/cpu"), "ServiceMonitor")
    monitor["spec"]["endpoint"] = monitor["spec"].pop("endpoints")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)
    runtime = find(render("kserve"), "ServingRuntime")
    runtime["spec"]["containers"][0]["readinessProbes"] = runtime["spec"]["containers"][0].pop("readinessProbe")
    with pytest.raises(jsonschema.ValidationError):
        validate_object(runtime)
    service = find(render("kserve"), "InferenceService")
    service["spec"]["predictor"]["model"]["resources"]["limit"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(service)
    job = find(render("train/pytorchjob"), "PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replica"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_object(job)
    job = find(render("train/pytorchjob"), "PyTorchJob")
    job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["envFrom"] = "oops"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_object(job)


def _serve(kustomization: str) -> tuple[list[Object], Object, dict[str, str]]:
    objects = render(kustomization)
    deployment = find(objects, "Deployment", "valley-serve")
    container = pod_spec(deployment)["containers"][0]
    config_name = container["envFrom"][0]["configMapRef"]["name"]
    return objects, deployment, dict(find(objects, "ConfigMap", config_name)["data"])


# What the secrets hold, as valley-serve checks it at start (the real ones come from deploy/README.md).
SECRET_FILES = {"VALLEY_TLS_CERT": "-----BEGIN CERTIFICATE-----\n", "VALLEY_TLS_KEY": "-----BEGIN PRIVATE KEY-----\n",
                "VALLEY_TOKENS_FILE": "an-admin-token-0123456789 admin\n"}


@pytest.mark.parametrize("kustomization", SERVE_OVERLAYS)
def test_the_settings_are_the_servers_and_parse(kustomization: str, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    _, deployment, settings = _serve(kustomization)
    fields = {f"VALLEY_{name.upper()}" for name in Settings.model_fields}
    assert set(settings) <= fields, f"not valley-serve settings: {sorted(set(settings) - fields)}"
    assert "VALLEY_INSECURE" not in settings, "the manifests serve TLS with tokens"
    mounts = {m["mountPath"]: m["name"] for m in pod_spec(deployment)["containers"][0]["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod_spec(deployment)["volumes"] if "secret" in v}
    for key, content in SECRET_FILES.items():
        folder = str(Path(settings[key]).parent)
        assert secrets[mounts[folder]] in ("valley-tls", "valley-tokens"), f"{key} is not in a mounted secret"
        stand_in = tmp_path / key
        stand_in.write_text(content)
        settings[key] = str(stand_in)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    parsed = parse_settings([])
    assert (parsed.grpc_port, parsed.http_port, parsed.metrics_port, str(parsed.repository)) == \
        (8001, 8000, 8002, "/models")
    assert parsed.http
    assert parsed.device == ("cuda" if kustomization.endswith("gpu") else "cpu")
    assert parsed.tls_cert is not None and parsed.tokens_file is not None and parsed.health_port == 8003


@pytest.mark.parametrize("kustomization", SERVE_OVERLAYS)
def test_probes_use_the_servers_health_services_and_shutdown_fits_the_grace_period(kustomization: str) -> None:
    _, deployment, settings = _serve(kustomization)
    spec = pod_spec(deployment)
    container = spec["containers"][0]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": int(settings["VALLEY_GRPC_PORT"]), "http": int(settings["VALLEY_HTTP_PORT"]),
                     "metrics": int(settings["VALLEY_METRICS_PORT"]), "health": int(settings["VALLEY_HEALTH_PORT"])}
    # The kubelet's gRPC probes cannot do TLS: they use the plaintext health-only port.
    for probe in ("startupProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": ports["health"], "service": LIVENESS_SERVICE}, probe
    assert container["readinessProbe"]["grpc"] == {"port": ports["health"], "service": ""}
    # The kubelet kills the pod this long after preStop starts: preStop, then the server's own drain.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(settings["VALLEY_SHUTDOWN_GRACE_S"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    assert mounts[settings["VALLEY_REPOSITORY"]]["readOnly"] is True
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    assert volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"] == "valley-models"
    assert {volumes[name]["secret"]["secretName"] for name in ("tls", "tokens")} == {"valley-tls", "valley-tokens"}
    assert not any(volumes[name]["secret"].get("optional") for name in ("tls", "tokens")), \
        "a pod without its certificate or tokens must not start (it would refuse to bind)"


def test_the_gpu_overlay_asks_for_a_gpu_node_and_the_cpu_one_for_cores() -> None:
    gpu = pod_spec(_serve("overlays/gpu")[1])
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    cpu = pod_spec(_serve("overlays/cpu")[1])
    assert "nvidia.com/gpu" not in json.dumps(cpu)
    assert cpu["containers"][0]["resources"]["limits"]["cpu"] == cpu["containers"][0]["resources"]["requests"]["cpu"]
    images = {kustomization: pod_spec(_serve(kustomization)[1])["containers"][0]["image"]
              for kustomization in SERVE_OVERLAYS}
    assert images["overlays/cpu"].endswith("-cpu") and images["overlays/gpu"].endswith("-gpu")


def _containers(document: Object) -> list[Object]:
    if document["kind"] == "ServingRuntime":
        return list(document["spec"]["containers"])
    if document["kind"] in ("Pod", "Deployment", "Job", "CronJob", "PyTorchJob"):
        return list(pod_spec(document)["containers"])
    return []


def _pod_security(document: Object) -> Object:
    if document["kind"] == "ServingRuntime":  # it has no pod-level securityContext: its container has all
        return dict(document["spec"]["containers"][0]["securityContext"])
    return dict(pod_spec(document)["securityContext"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_runs_non_root_read_only_without_privileges(kustomization: str) -> None:
    workloads = [document for document in render(kustomization) if _containers(document)]
    assert workloads or kustomization in ("train/base", "fleet-database"), \
        "only the training volumes and recipe, and the database an operator runs, run nothing of ours"
    for workload in workloads:
        pod = _pod_security(workload)
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001 and pod["seccompProfile"]["type"] == \
            "RuntimeDefault", workload["kind"]
        for container in _containers(workload):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, container["name"]
            assert security["readOnlyRootFilesystem"] is True, container["name"]
            assert security["capabilities"]["drop"] == ["ALL"], container["name"]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.mark.parametrize("kustomization", SERVE_OVERLAYS)
def test_services_monitors_budgets_and_policies_point_at_the_pods(kustomization: str) -> None:
    objects, deployment, _ = _serve(kustomization)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container_ports = {port["name"] for port in pod_spec(deployment)["containers"][0]["ports"]}
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"valley-serve", "valley-serve-pods"}
    for service in services:
        assert _selects(service["spec"]["selector"], pod_labels)
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= container_ports
    assert find(objects, "Service", "valley-serve-pods")["spec"]["clusterIP"] == "None"
    monitor = find(objects, "ServiceMonitor")
    service = find(objects, "Service", "valley-serve")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    assert _selects(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    policy = find(objects, "NetworkPolicy", "valley-serve")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == \
        {"grpc", "http", "metrics"}
    assert policy["spec"]["egress"] == [] and "Egress" in policy["spec"]["policyTypes"]
    hpa = find(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "valley-serve"}
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"
    kinds = {metric["type"]: metric for metric in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    custom = kinds["Pods"]["pods"]["metric"]["name"]
    assert custom in {rule["name"]["as"] for rule in adapter_rules()}, "the adapter serves the HPA's metric"
    dashboard = find(objects, "ConfigMap", "valley-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["valley-dashboard.json"]) == json.loads(
        (REPO / "deploy" / "grafana" / "valley-dashboard.json").read_text())


def test_the_prometheus_rule_holds_the_rules_file_and_passes_promtool(tmp_path: Path) -> None:
    rule = find(render("overlays/gpu"), "PrometheusRule")
    rules_file = yaml.safe_load((REPO / "deploy" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == rules_file["groups"], "deploy/prometheus/rules.yml and the PrometheusRule differ"
    rendered = tmp_path / "rendered-rules.yml"
    rendered.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = subprocess.run(["promtool", "check", "rules", str(rendered)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout


def test_the_kserve_runtime_runs_valley_serve_on_grpc_v2() -> None:
    objects = render("kserve")
    runtime, service = find(objects, "ServingRuntime"), find(objects, "InferenceService")
    container = runtime["spec"]["containers"][0]
    assert container["name"] == "kserve-container"
    settings = parse_settings(container["args"])
    assert str(settings.repository) == "/mnt/models"
    assert [port["containerPort"] for port in container["ports"]] == [settings.grpc_port]
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    assert container["readinessProbe"]["grpc"] == {"port": settings.grpc_port, "service": ""}
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] == "grpc-v2"
    assert model["ports"][0]["containerPort"] == settings.grpc_port and model["ports"][0]["name"] == "h2c"
    assert model["storageUri"] == "pvc://valley-models/"


def _train_settings(objects: list[Object]) -> dict[str, str]:
    return dict(find(objects, "ConfigMap", "valley-train")["data"])


@pytest.mark.parametrize("kustomization", ["train/indexed-job", "train/pytorchjob"])
def test_the_training_job_runs_the_pipeline_with_a_recipe_valley_train_accepts(kustomization: str) -> None:
    objects = render(kustomization)
    job = find(objects, "Job" if kustomization.endswith("indexed-job") else "PyTorchJob")
    spec = pod_spec(job)
    container = spec["containers"][0]
    assert container["command"] == ["bash", "/etc/valley/pipeline.sh"]
    script = find(objects, "ConfigMap", "valley-train-pipeline")["data"]["pipeline.sh"]
    assert script == (K8S / "train" / "base" / "pipeline.sh").read_text()
    syntax = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    settings = _train_settings(objects)
    parser = build_parser()
    parser.parse_args(["train", *shlex.split(settings["VALLEY_TRAIN_ARGS"]), "--out", "/runs/x/base", "--resume"])
    fge = parser.parse_args(["fge", "--from", "/runs/x/base", *shlex.split(settings["VALLEY_FGE_ARGS"]),
                             "--out", "/runs/x/fge", "--resume"])
    train = parser.parse_args(["train", *shlex.split(settings["VALLEY_TRAIN_ARGS"]), "--out", "x"])
    assert fge.start_epoch in train.save_epochs, "FGE starts from a checkpoint the base run keeps"
    claims = {volume["name"]: volume["persistentVolumeClaim"]["claimName"] for volume in spec["volumes"]
              if "persistentVolumeClaim" in volume}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    assert claims[mounts[settings["VALLEY_MODELS"]]] == "valley-models", "exports go to the served repository"
    serving = {o["metadata"]["name"] for o in render("base") if o["kind"] == "PersistentVolumeClaim"}
    assert "valley-models" in serving
    target_host = settings["VALLEY_RELOAD_TARGET"].split(".")[0]
    assert target_host in {o["metadata"]["name"] for o in render("base") if o["kind"] == "Service"}
    reload_args = reload_parser().parse_args(["--target", settings["VALLEY_RELOAD_TARGET"], "--model", "m",
                                              *shlex.split(settings["VALLEY_RELOAD_ARGS"])])
    secrets = {volume["name"]: volume["secret"] for volume in spec["volumes"] if "secret" in volume}
    for path, secret, key in ((reload_args.tls_ca, "valley-tls", "ca.crt"),
                              (reload_args.token_file, "valley-admin-token", "token")):
        folder, name = path.rsplit("/", 1)
        volume = secrets[mounts[folder]]
        assert volume["secretName"] == secret and name == key, "valley-reload reads the mounted secrets"
    env = {item["name"]: item for item in container["env"]}
    assert "$(" in env["VALLEY_RUN_DIR"]["value"], "each job trains in a run folder of its own"
    if job["kind"] == "Job":
        nodes = int(env["PET_NNODES"]["value"])
        assert job["spec"]["completionMode"] == "Indexed"
        assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
        headless = find(objects, "Service", spec["subdomain"])
        assert headless["spec"]["clusterIP"] == "None"
        assert _selects(headless["spec"]["selector"], job["spec"]["template"]["metadata"]["labels"])
        host, port = env["PET_RDZV_ENDPOINT"]["value"].split(":")
        assert host == f"{job['metadata']['name']}-0.{spec['subdomain']}", "the rendezvous is at pod 0"
        assert int(port) in {p["containerPort"] for p in container["ports"]}
        assert int(port) in {p["port"] for p in headless["spec"]["ports"]}
        assert env["PET_RDZV_ID"]["value"] == "$(JOB_UID)"
    else:
        assert container["name"] == "pytorch", "the training operator finds the container by this name"
        assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master", "Worker"}
        assert env["PET_RDZV_ENDPOINT"]["value"].startswith("$(JOB_NAME)-master-0:"), "the master's Service"
    assert env["PET_RDZV_BACKEND"]["value"] == "c10d", "the rendezvous that survives a pod's restart"
    names = [item["name"] for item in container["env"]]
    for variable in ("JOB_UID", "JOB_NAME"):
        if variable in names:  # $(VAR) expands only from variables defined before it
            assert names.index(variable) < names.index("VALLEY_RUN_DIR") < names.index("PET_RDZV_ID")


def test_the_adapter_queries_are_promql(tmp_path: Path) -> None:
    rules = tmp_path / "adapter.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": [
        {"record": f"adapter:query_{index}", "expr": expression}
        for index, expression in enumerate(adapter_expressions())]}]}))
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_fleet_shares_one_store_polls_the_repository_and_recalibrates_as_a_job() -> None:
    objects, deployment, settings = _serve("overlays/fleet")
    serving = pod_spec(deployment)
    container = serving["containers"][0]
    store = {"secretKeyRef": {"name": "valley-feedback-app", "key": "uri"}}
    env = {entry["name"]: entry.get("valueFrom") for entry in container["env"]}
    assert env == {"VALLEY_FEEDBACK_STORE": store, "VALLEY_REPLICA": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert settings["VALLEY_MODEL_CONTROL_MODE"] == "poll"
    fields = {f"VALLEY_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, "the secret and the pod's name reach the server as its settings"
    models = {volume["name"]: volume for volume in serving["volumes"]}["models"]["persistentVolumeClaim"]
    assert models["readOnly"] is True and models["claimName"] == "valley-models"
    assert find(objects, "PersistentVolumeClaim", "valley-models")["spec"]["accessModes"] == ["ReadWriteMany"]

    job = pod_spec(find(objects, "CronJob", "valley-recalibrate"))
    runner = job["containers"][0]
    assert runner["image"] == container["image"], "valley-recalibrate ships in the serving image"
    job_env = {entry["name"]: entry.get("value", entry.get("valueFrom")) for entry in runner["env"]}
    assert job_env["VALLEY_FEEDBACK_STORE"] == store
    mounts = {mount["name"]: mount for mount in runner["volumeMounts"]}
    claim = {volume["name"]: volume for volume in job["volumes"]}["models"]["persistentVolumeClaim"]
    assert claim["claimName"] == "valley-models" and not claim.get("readOnly") and not mounts["models"].get("readOnly")
    script = runner["args"][0]
    command = shlex.split(script.split(";")[0])
    values = {f"${name}": str(value) for name, value in job_env.items() if isinstance(value, str)}
    values["$VALLEY_FEEDBACK_STORE"] = "postgresql://valley@valley-feedback-rw.valley:5432/valley"
    assert command[0] == "valley-recalibrate"
    arguments = recalibrate_parser().parse_args([values.get(word, word) for word in command[1:]])
    assert str(arguments.repository) == mounts["models"]["mountPath"] == "/models" and arguments.min_labels == 100
    assert 'if [ "$status" -eq 3 ]; then exit 0; fi' in script, "not enough labels yet is not a failed Job"

    policy = find(objects, "NetworkPolicy", "valley-feedback-store")
    selected = policy["spec"]["podSelector"]["matchExpressions"][0]["values"]
    assert set(selected) == {deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"],
                             find(objects, "CronJob", "valley-recalibrate")["spec"]["jobTemplate"]["spec"]["template"]
                             ["metadata"]["labels"]["app.kubernetes.io/name"]}
    database = find(objects, "Cluster", "valley-feedback")
    assert policy["spec"]["egress"][0]["to"][0]["podSelector"]["matchLabels"] == \
        {"cnpg.io/cluster": database["metadata"]["name"]}
    assert policy["spec"]["egress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}]
    # CloudNativePG names the application Secret <cluster>-app; its `uri` reaches the database valley as valley.
    assert store["secretKeyRef"]["name"] == f"{database['metadata']['name']}-app"
    assert database["spec"]["bootstrap"]["initdb"]["database"] == database["spec"]["bootstrap"]["initdb"]["owner"] \
        == "valley"


def test_the_database_cluster_is_validated_against_its_crd() -> None:
    cluster = find(render("fleet-database"), "Cluster", "valley-feedback")
    validate_object(cluster)
    cluster["spec"]["instance"] = cluster["spec"].pop("instances")
    with pytest.raises(jsonschema.ValidationError, match="instance"):
        validate_object(cluster)
