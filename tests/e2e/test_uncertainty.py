"""Uncertainty that acts, end to end: abstention, the drift score and recalibration from feedback labels.

`valley-serve` as a user starts it, on a repository of the test's own (recalibration publishes
into it), talked to with tritonclient and the generated valley.v1 stubs, its `/metrics` scraped.
The images are the synthetic dataset's (what the ensemble was trained on) and shifted copies of
them: noise on top, which the ensemble answers far less accurately than its confidence says.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from artefact.manifest import load_manifest
from artefact.selective import score_served
from artefact.uncertainty import outputs_at
from service._proto.valley.v1 import calibration_pb2 as calibration_pb
from service._proto.valley.v1 import calibration_pb2_grpc as calibration_grpc
from service.core.abstention import Abstention
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, report, scraped, start_server_process, stop_server_process, triton_inputs
from training.data import synthetic_images

WINDOW = 200


def _images(count: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic images the ensemble has not seen (uint8 [N, 1, 16, 16]) and their labels; `noise`: the standard
    deviation of pixel noise added on top (the shift)."""
    split = synthetic_images(count, seed=seed)
    pixels = split.images.numpy().astype(np.float64)
    if noise:
        pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), split.labels.numpy()


def _value(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return metrics.get((name, tuple(sorted({"model": MODEL, **labels}.items()))))


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProcess]]:
    repository = tmp_path_factory.mktemp("uncertainty") / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    served = start_server_process(repository, "--drift-window", str(WINDOW), "--recalibration-min-labels", "100",
                                  "--calibration-window", "400")
    yield repository, served
    stop_server_process(served)


def _client(served: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served.url)


def _calibration(served: ServerProcess) -> tuple[grpc.Channel, calibration_grpc.CalibrationStub]:
    channel = grpc.insecure_channel(served.url)
    return channel, calibration_grpc.CalibrationStub(channel)  # type: ignore[no-untyped-call]


def test_the_abstain_flag_follows_the_target_accuracy(server: tuple[Path, ServerProcess]) -> None:
    repository, served = server
    abstention = Abstention.of(load_manifest(repository / MODEL / "1"))
    assert abstention is not None and abstention.ratio == 1.0
    pixels, _ = _images(64, seed=11, noise=40)
    outputs = [triton.InferRequestedOutput(name) for name in ("abstain", "probabilities", "confidence", "entropy",
                                                              "mutual_information")]
    client = _client(served)
    abstained = {}
    for target in (0.5, 0.9, 0.97, 0.99, 0.999):
        result = client.infer(MODEL, triton_inputs(pixels), outputs=outputs, parameters={"target_accuracy": target})
        flags = result.as_numpy("abstain")
        assert flags.dtype == np.bool_ and flags.shape == (64,)
        served_outputs = {name: result.as_numpy(name) for name in ("probabilities", "confidence", "entropy",
                                                                   "mutual_information")}
        expected = score_served(abstention.spec.signal, served_outputs) < abstention.threshold(target)
        np.testing.assert_array_equal(flags, expected)
        assert result.get_response().parameters["target_accuracy"].double_param == target
        abstained[target] = flags
    for lower, higher in zip(list(abstained)[:-1], list(abstained)[1:], strict=True):
        assert np.all(abstained[higher] >= abstained[lower]), "a higher target abstains on at least as many images"
    assert abstained[0.999].sum() > abstained[0.5].sum(), "the targets make a difference on shifted images"
    default = client.infer(MODEL, triton_inputs(pixels))
    assert default.get_response().parameters["target_accuracy"].double_param == abstention.spec.default_target
    np.testing.assert_array_equal(default.as_numpy("abstain"), abstained[0.99])
    # A string holding a number is taken too (clients that send every parameter as a string).
    text = client.infer(MODEL, triton_inputs(pixels), outputs=outputs[:1], parameters={"target_accuracy": "0.9"})
    np.testing.assert_array_equal(text.as_numpy("abstain"), abstained[0.9])
    metrics = scraped(served)
    assert _value(metrics, "valley_selective_images_total", version="1", abstained="true") == \
        sum(int(flags.sum()) for flags in abstained.values()) + abstained[0.99].sum() + abstained[0.9].sum()


@pytest.mark.parametrize("target", [0, 1.5, -0.2, float("nan"), "most", True])
def test_a_bad_target_accuracy_is_invalid_argument(server: tuple[Path, ServerProcess], target: object) -> None:
    pixels, _ = _images(2, seed=12)
    with pytest.raises(InferenceServerException) as error:
        _client(server[1]).infer(MODEL, triton_inputs(pixels), parameters={"target_accuracy": target})
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "target_accuracy" in str(error.value) and "(0, 1]" in str(error.value)


def test_the_drift_score_is_low_on_the_training_distribution_and_rises_under_shift(
        exported: Path, tmp_path: Path) -> None:
    """A server of its own: the drift window holds only what this test sends."""
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    served = start_server_process(repository, "--drift-window", str(WINDOW))
    try:
        client = _client(served)
        metrics = scraped(served)
        clean_level = _value(metrics, "valley_drift_clean_level", version="1")
        assert clean_level is not None and clean_level > 0
        assert _value(metrics, "valley_drift_score", version="1") is None, "no score before the window is full"
        assert _value(metrics, "valley_drift_window_size_images", version="1") == WINDOW
        scores = []
        for noise in (0, 60, 120, 240):
            pixels, _ = _images(WINDOW, seed=20 + int(noise), noise=noise)
            for start in range(0, WINDOW, 50):
                client.infer(MODEL, triton_inputs(pixels[start:start + 50]))
            score = _value(scraped(served), "valley_drift_score", version="1")
            assert score is not None
            scores.append(score)
        assert scores[0] < clean_level, f"the training distribution stays under the clean level: {scores}"
        assert scores == sorted(scores), f"more noise, more drift: {scores}"
        assert scores[-1] > 2 * clean_level, f"heavy noise is far from the training images: {scores}"
    finally:
        stop_server_process(served)


def test_recalibration_round_trip(server: tuple[Path, ServerProcess]) -> None:
    repository, served = server
    client = _client(served)
    channel, calibration = _calibration(served)
    with channel:
        with pytest.raises(grpc.RpcError) as early:
            calibration.Suggest(calibration_pb.SuggestRequest(model_name=MODEL), timeout=10)
        assert early.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "labelled" in str(early.value.details())

        def stream(seed: int, version: str) -> None:
            """A shifted stream, served and labelled: 400 images in requests of 50."""
            pixels, labels = _images(400, seed=seed, noise=70)
            for start in range(0, 400, 50):
                request_id = f"shifted-{seed}-{start}"
                result = client.infer(MODEL, triton_inputs(pixels[start:start + 50]), request_id=request_id)
                assert result.get_response().model_version == version
                report(served.url, [(request_id, row, int(labels[start + row])) for row in range(50)])

        stream(seed=31, version="1")
        drift_before = _value(scraped(served), "valley_drift_score", version="1")
        suggestion = calibration.Suggest(calibration_pb.SuggestRequest(model_name=MODEL), timeout=30)
        assert suggestion.labels == 400 and suggestion.model_version == "1"
        assert suggestion.suggested_temperature > 1.2 * suggestion.temperature, "shifted images are overconfident"
        assert suggestion.suggested.ece < suggestion.current.ece and suggestion.suggested.nll < suggestion.current.nll
        metrics = scraped(served)
        assert _value(metrics, "valley_suggested_temperature", version="1") == \
            pytest.approx(suggestion.suggested_temperature)
        before = _value(metrics, "valley_live_metric", version="1", metric="ece")
        assert before == pytest.approx(suggestion.current.ece)
        assert _value(metrics, "valley_recalibration_metric", version="1", metric="ece", temperature="current") == \
            pytest.approx(suggestion.current.ece)
        assert _value(metrics, "valley_recalibration_metric", version="1", metric="ece",
                      temperature="suggested") == pytest.approx(suggestion.suggested.ece)

        with pytest.raises(grpc.RpcError) as bad:
            calibration.Recalibrate(calibration_pb.RecalibrateRequest(model_name=MODEL, temperature=-1), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answer = calibration.Recalibrate(calibration_pb.RecalibrateRequest(model_name=MODEL), timeout=120)
        assert answer.published_version == "2" and answer.temperature == pytest.approx(
            suggestion.suggested_temperature, rel=1e-3)

    manifest = load_manifest(repository / MODEL / "2")
    parent = load_manifest(repository / MODEL / "1")
    assert manifest.temperature == pytest.approx(answer.temperature)
    assert manifest.recalibration is not None and manifest.recalibration.parent_version == 1
    assert manifest.recalibration.labels == 400
    assert [m.sha256 for m in manifest.members] == [m.sha256 for m in parent.members], "the same members"
    assert manifest.fused.sha256 != parent.fused.sha256, "the fused graph carries the new temperature"
    assert manifest.drift is not None and manifest.drift.temperature == parent.temperature
    assert client.get_model_metadata(MODEL, as_json=True)["versions"] == ["2"]
    assert _value(scraped(served), "valley_temperature", version="2") == pytest.approx(manifest.temperature)

    stream(seed=32, version="2")  # the same shift, new images, answered by the recalibrated version
    metrics = scraped(served)
    after = _value(metrics, "valley_live_metric", version="2", metric="ece")
    assert before is not None and after is not None
    assert after < 0.7 * before, f"the live ECE fell: {before:.3f} -> {after:.3f}"
    # The drift baseline was taken at version 1's temperature, and version 2's answers are scored there: the same
    # shift drifts as much as before (answers at the new temperature would look like more drift).
    drift_after = _value(metrics, "valley_drift_score", version="2")
    assert drift_before is not None and drift_after is not None
    assert drift_after == pytest.approx(drift_before, rel=0.5), (drift_before, drift_after)
    # Abstention too is decided at the temperature its thresholds were fitted at.
    abstention = Abstention.of(manifest)
    assert abstention is not None and abstention.ratio == pytest.approx(manifest.temperature / parent.temperature)
    pixels, _ = _images(64, seed=33, noise=70)
    names = ("abstain", "probabilities", "member_probabilities", "members_used")
    result = client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput(n) for n in names],
                          parameters={"target_accuracy": 0.97})
    expected = Abstention.of(parent)
    assert expected is not None
    parent_outputs = outputs_at(result.as_numpy("member_probabilities"), result.as_numpy("members_used"),
                                abstention.ratio, result.as_numpy("probabilities"))
    np.testing.assert_array_equal(result.as_numpy("abstain"),
                                  score_served(expected.spec.signal, parent_outputs) < expected.threshold(0.97))


def test_a_recalibrated_version_survives_a_restart(server: tuple[Path, ServerProcess]) -> None:
    repository, _ = server
    if not (repository / MODEL / "2").is_dir():
        pytest.fail("test_recalibration_round_trip publishes version 2 first")
    again = start_server_process(repository)
    try:
        client = _client(again)
        assert client.get_model_metadata(MODEL, as_json=True)["versions"] == ["2"]
        pixels, _ = _images(8, seed=40)
        assert client.infer(MODEL, triton_inputs(pixels)).get_response().model_version == "2"
    finally:
        stop_server_process(again)
