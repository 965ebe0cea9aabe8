"""The Grafana dashboard, the Prometheus rules and the autoscaler's adapter query only metrics a real server exports."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import tritonclient.grpc as triton

from tests.conftest import REPO
from tests.e2e.conftest import MODEL, Reference, ThreadServer, report, thread_settings, triton_inputs
from tests.kube import adapter_expressions

DASHBOARD = REPO / "deploy" / "grafana" / "valley-dashboard.json"
RULES = REPO / "deploy" / "prometheus" / "rules.yml"
# A metric name in PromQL: valley_ then word characters; recorded series (valley:...) are the rules' own.
METRIC = re.compile(r"\bvalley_[a-z_]+\b")


def _dashboard_expressions() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def _rule_expressions() -> list[str]:
    """The rules file without its comments: every valley_ name in it is in an expression."""
    return [line.split("#")[0] for line in RULES.read_text().splitlines() if not line.lstrip().startswith("#")]


def test_every_metric_the_dashboard_rules_and_adapter_query_is_exported(repository: Path, reference: Reference,
                                                                        tmp_path: Path) -> None:
    # Per-member times exist only where members run one by one, load failures once a version was refused (here a
    # version 2 with a broken graph); every other metric is there either way.
    own = tmp_path / "repository"
    shutil.copytree(repository, own)
    shutil.copytree(own / MODEL / "1", own / MODEL / "2")
    manifest = json.loads((own / MODEL / "2" / "manifest.json").read_text())
    (own / MODEL / "2" / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    (own / MODEL / "2" / manifest["fused"]["file"]).write_bytes(b"not a graph")
    # A drift window and a labels minimum of 4: the score and the suggested temperature exist after these 4 images.
    with ThreadServer(thread_settings(own, execution="members", drift_window=4,
                                      recalibration_min_labels=4)) as server:
        pixels = reference.images(4, seed=1)
        result = triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels), request_id="dash",
                                                                outputs=[triton.InferRequestedOutput(name) for name
                                                                         in ("probabilities", "abstain",
                                                                             "prediction_set")])
        predicted = result.as_numpy("probabilities").argmax(axis=1)
        assert report(server.url, [("dash", i, int(c)) for i, c in enumerate(predicted)]) == len(pixels)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    expressions = _dashboard_expressions() + _rule_expressions() + adapter_expressions()
    assert len(_dashboard_expressions()) >= 14
    queried = {name for expression in expressions for name in METRIC.findall(expression)}
    missing = sorted(queried - exported)
    assert not missing, f"queried but not exported: {missing}"
    for panel in ("Latency", "Queue depth", "Mean batch size", "confidence", "entropy", "disagreement", "Networks run",
                  "live ECE vs offline", "drift", "Abstained", "suggested temperature", "estimated without labels",
                  "Prediction sets"):
        assert any(panel in p["title"] for p in json.loads(DASHBOARD.read_text())["panels"]), panel
