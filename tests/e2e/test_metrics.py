"""The Prometheus metrics after real RPCs, read from the server's own (fresh) registry and its /metrics port."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from artefact.metrics import accuracy, brier, ece, nll
from tests.e2e.conftest import MODEL, Reference, ThreadServer, report, thread_settings, triton_inputs

LABELS = {"model": MODEL, "version": "1"}


@pytest.fixture
def server(repository: Path) -> Iterator[ThreadServer]:
    running = ThreadServer(thread_settings(repository, execution="members"))
    yield running
    running.close()


def _value(server: ThreadServer, name: str, **labels: str) -> float:
    value = server.server.registry.get_sample_value(name, {**LABELS, **labels})
    return 0.0 if value is None else value


def test_requests_runs_and_signals_are_counted(server: ThreadServer, reference: Reference, exported: Path) -> None:
    client = triton.InferenceServerClient(server.url)
    batches = [reference.images(size, seed=size) for size in (1, 3, 8, 5)]
    for pixels in batches:  # the clients ask only for probabilities: the signals are computed anyway
        client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput("probabilities")])
    images = np.concatenate(batches)
    expected = reference(images)
    runs = int(client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]["execution_count"])

    assert _value(server, "valley_requests_total", code="OK") == len(batches)
    assert _value(server, "valley_request_duration_seconds_count") == len(batches)
    assert _value(server, "valley_queue_duration_seconds_count") == len(batches)
    assert _value(server, "valley_compute_duration_seconds_count") == runs
    assert _value(server, "valley_batch_images_count") == runs
    assert _value(server, "valley_batch_images_sum") == len(images)
    for histogram, output in (("valley_confidence_ratio", "confidence"), ("valley_predictive_entropy_nats", "entropy"),
                              ("valley_mutual_information_nats", "mutual_information"),
                              ("valley_member_disagreement_ratio", "member_disagreement")):
        assert _value(server, f"{histogram}_count") == len(images), histogram
        assert _value(server, f"{histogram}_sum") == pytest.approx(float(expected[output].sum()), abs=1e-4)
    # The confidence buckets are ECE's 15 bins: the 1/15 bucket counts confidences <= 1/15.
    top = float(np.sum(expected["confidence"] <= 1.0))
    assert _value(server, "valley_confidence_ratio_bucket", le="1.0") == top
    classes = json.loads((exported / "manifest.json").read_text())["classes"]
    counts = np.bincount(expected["predicted_class"], minlength=len(classes))
    for index, name in enumerate(classes):
        assert _value(server, "valley_predicted_class_total", **{"class": name}) == counts[index], name
    members = len(json.loads((exported / "manifest.json").read_text())["members"])
    for member in range(members):
        assert _value(server, "valley_member_compute_duration_seconds_count", member=str(member)) == runs
    assert _value(server, "valley_in_flight_requests") == 0
    assert _value(server, "valley_queue_depth_requests") == 0


def test_errors_are_counted_by_code_with_bounded_labels(server: ThreadServer, reference: Reference) -> None:
    client = triton.InferenceServerClient(server.url)
    calls: list[Callable[[], object]] = [lambda: client.infer("unknown-model", triton_inputs(reference.images(1, 0))),
                                         lambda: client.infer(MODEL, triton_inputs(reference.images(1, 0)[:, :, :4]))]
    for call in calls:
        with pytest.raises(InferenceServerException):
            call()
    registry = server.server.registry
    assert registry.get_sample_value("valley_requests_total",
                                     {"model": "", "version": "", "code": "NOT_FOUND"}) == 1
    assert _value(server, "valley_requests_total", code="INVALID_ARGUMENT") == 1
    assert _value(server, "valley_request_duration_seconds_count") == 0, "refused requests never reached a model"


def test_model_state_provider_offline_quality_and_temperature(server: ThreadServer, exported: Path) -> None:
    manifest = json.loads((exported / "manifest.json").read_text())
    assert _value(server, "valley_model_ready") == 1
    assert _value(server, "valley_execution_provider_info", provider="CPUExecutionProvider") == 1
    assert _value(server, "valley_temperature") == pytest.approx(manifest["temperature"])
    for calibrated, key in (("true", "calibrated"), ("false", "uncalibrated")):
        for metric in ("accuracy", "ece", "nll", "brier"):
            assert _value(server, "valley_offline_metric", metric=metric, calibrated=calibrated) == \
                pytest.approx(manifest["metrics"][key][metric])
    triton.InferenceServerClient(server.url).unload_model(MODEL)
    assert _value(server, "valley_model_ready") == 0


def test_the_metrics_port_serves_the_registry(server: ThreadServer, reference: Reference) -> None:
    triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(reference.images(2, 1)))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.ports.metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'valley_requests_total{code="OK",model="synth",version="1"} 1.0' in text
    assert "# HELP valley_confidence_ratio" in text and "process_resident_memory_bytes" in text


def test_with_metrics_off_only_process_metrics_remain(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository, metrics=False)) as server:
        pixels = reference.images(2, seed=3)
        result = triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels))
        np.testing.assert_allclose(result.as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)
        names = {metric.name for metric in server.server.registry.collect()}
        assert not any(name.startswith("valley_") for name in names) and "process_resident_memory_bytes" in names


def test_feedback_gives_the_calibration_training_computes(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository, calibration_window=12)) as server:
        client = triton.InferenceServerClient(server.url)
        rng = np.random.default_rng(0)
        served, labels, reports = [], [], []
        for index in range(5):
            pixels = reference.images(4, seed=30 + index)
            result = client.infer(MODEL, triton_inputs(pixels), request_id=f"r{index}",
                                  outputs=[triton.InferRequestedOutput("predicted_class")])
            assert result.as_numpy("probabilities") is None, "the client gets only what it asked for"
            served.append(reference(pixels)["probabilities"])
            for position in range(4):
                true_class = int(rng.integers(0, 10))
                labels.append(true_class)
                reports.append((f"r{index}", position, true_class))
        client.infer(MODEL, triton_inputs(reference.images(1, seed=9)))  # no id: cannot be labelled, not kept
        assert report(server.url, reports[:7]) == 7
        assert report(server.url, reports[7:]) == 13
        probabilities, truth = np.concatenate(served).astype(np.float64), np.array(labels)

        def total(name: str) -> float:
            return sum(_value(server, name, bin=str(b)) for b in range(15))

        count = total("valley_feedback_labels_total")
        assert count == len(truth)
        # What the recording rule computes in PromQL, from the bin counters.
        promql_ece = sum(abs(_value(server, "valley_feedback_confidence_total", bin=str(b))
                             - _value(server, "valley_feedback_correct_total", bin=str(b))) for b in range(15)) / count
        assert promql_ece == pytest.approx(ece(probabilities, truth), abs=1e-6)
        assert total("valley_feedback_correct_total") / count == pytest.approx(accuracy(probabilities, truth))
        assert _value(server, "valley_feedback_nll_total") / count == pytest.approx(nll(probabilities, truth), abs=1e-5)
        assert _value(server, "valley_feedback_brier_total") / count == pytest.approx(brier(probabilities, truth),
                                                                                      abs=1e-5)
        window = slice(len(truth) - 12, len(truth))
        assert _value(server, "valley_live_window_predictions") == 12
        assert _value(server, "valley_live_metric", metric="ece") == pytest.approx(
            ece(probabilities[window], truth[window]), abs=1e-6)
        assert _value(server, "valley_live_metric", metric="accuracy") == pytest.approx(
            accuracy(probabilities[window], truth[window]))


def test_bad_feedback_is_refused_with_the_right_status(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository)) as server:
        pixels = reference.images(2, seed=1)
        triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels), request_id="a")
        assert report(server.url, [("a", 0, 3)]) == 1
        cases = [([("a", 0, 3)], grpc.StatusCode.ALREADY_EXISTS, "already labelled"),
                 ([("a", 1, 2), ("zzz", 0, 1)], grpc.StatusCode.NOT_FOUND, "no prediction kept"),
                 ([("a", 1, 10)], grpc.StatusCode.INVALID_ARGUMENT, "not one of the model's 10 classes"),
                 ([("a", 7, 1)], grpc.StatusCode.INVALID_ARGUMENT, "had 2 images"),
                 ([], grpc.StatusCode.INVALID_ARGUMENT, "no labels")]
        for labels, code, words in cases:
            with pytest.raises(grpc.RpcError) as error:
                report(server.url, labels)
            assert error.value.code() == code and words in error.value.details(), labels
        assert report(server.url, [("a", 1, 2)]) == 1, "the refused reports counted nothing"
        assert sum(_value(server, "valley_feedback_labels_total", bin=str(b)) for b in range(15)) == 2
    with ThreadServer(thread_settings(repository, metrics=False)) as off:
        with pytest.raises(grpc.RpcError) as error:
            report(off.url, [("a", 0, 1)])
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_feedback_has_a_setting_of_its_own(repository: Path, reference: Reference) -> None:
    pixels = reference.images(2, seed=2)
    with ThreadServer(thread_settings(repository, metrics=False, feedback=True)) as server:
        triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels), request_id="a",
                                                       outputs=[triton.InferRequestedOutput("confidence")])
        assert report(server.url, [("a", 1, 4)]) == 1, "labels are taken without metrics"
        assert not any(metric.name.startswith("valley_") for metric in server.server.registry.collect())
    with ThreadServer(thread_settings(repository, feedback=False)) as server:
        triton.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels), request_id="a")
        with pytest.raises(grpc.RpcError) as error:
            report(server.url, [("a", 0, 1)])
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--feedback" in error.value.details()
        assert _value(server, "valley_requests_total", code="OK") == 1, "metrics stay on"
        assert server.server.feedback.store is None, "no predictions are kept"
