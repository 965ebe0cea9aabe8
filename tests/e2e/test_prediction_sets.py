"""Prediction sets and accuracy estimated without labels, end to end.

`valley-serve` as a user starts it on the exported synthetic ensemble, talked to with tritonclient
over gRPC and HTTP (binary and JSON): the `prediction_set` and `set_size` outputs at any requested
coverage, checked against the manifest's fitted scores and against MAPIE's sets on the same
probabilities; labels sent back through valley.v1.Feedback and the live coverage counters they
move; the estimated accuracy gauge against the map the export fitted.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from artefact.estimation import AccuracyMap
from artefact.manifest import load_manifest
from service.core.sets import PredictionSets
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, report, scraped, start_server_process, stop_server_process, triton_inputs
from tests.test_conformal import mapie_lac_sets
from training.data import synthetic_images

WINDOW = 120
SET_OUTPUTS = ("prediction_set", "set_size", "probabilities", "confidence")


def _images(count: int, seed: int, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    split = synthetic_images(count, seed=seed)
    pixels = split.images.numpy().astype(np.float64)
    if noise:
        pixels += np.random.default_rng(seed).normal(0, noise, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8), split.labels.numpy()


@pytest.fixture(scope="module")
def server(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, ServerProcess]]:
    repository = tmp_path_factory.mktemp("sets") / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    served = start_server_process(repository, "--drift-window", str(WINDOW))
    yield repository, served
    stop_server_process(served)


def _sets(repository: Path) -> PredictionSets:
    sets = PredictionSets.of(load_manifest(repository / MODEL / "1"))
    assert sets is not None and sets.ratio == 1.0
    return sets


def _infer(served: ServerProcess, pixels: np.ndarray, request_id: str = "", **parameters: object
           ) -> triton.InferResult:
    outputs = [triton.InferRequestedOutput(name) for name in SET_OUTPUTS]
    return triton.InferenceServerClient(served.url).infer(MODEL, triton_inputs(pixels), outputs=outputs,
                                                          request_id=request_id, parameters=parameters or None)


def test_sets_follow_the_coverage_asked_for(server: tuple[Path, ServerProcess]) -> None:
    repository, served = server
    sets = _sets(repository)
    classes = len(load_manifest(repository / MODEL / "1").classes)
    pixels, _ = _images(64, seed=21, noise=30)
    answered = {}
    for score in ("lac", "aps", "raps"):
        for coverage in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
            result = _infer(served, pixels, coverage=coverage, conformal_score=score)
            chosen, size = result.as_numpy("prediction_set"), result.as_numpy("set_size")
            assert chosen.dtype == np.bool_ and chosen.shape == (64, classes)
            assert size.dtype == np.int64 and np.array_equal(size, chosen.sum(axis=1))
            expected = sets.sets({"probabilities": result.as_numpy("probabilities")}, coverage, score)
            np.testing.assert_array_equal(chosen, expected)
            parameters = result.get_response().parameters
            assert parameters["coverage"].double_param == coverage
            assert parameters["conformal_score"].string_param == score
            answered[(score, coverage)] = chosen
        assert answered[(score, 1.0)].all(), "coverage 1 holds every class"
        levels = [answered[(score, c)] for c in (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)]
        for smaller, larger in pairwise(levels):
            assert np.all(larger >= smaller), "sets nest: a lower coverage's set is inside a higher one's"
        assert levels[0].sum() < levels[-1].sum()
    default = _infer(served, pixels)
    assert default.get_response().parameters["coverage"].double_param == sets.spec.default_coverage
    assert default.get_response().parameters["conformal_score"].string_param == sets.spec.default_score
    np.testing.assert_array_equal(default.as_numpy("prediction_set"),
                                  answered[(sets.spec.default_score, sets.spec.default_coverage)])
    text = _infer(served, pixels, coverage="0.95", conformal_score="aps")
    np.testing.assert_array_equal(text.as_numpy("prediction_set"), answered[("aps", 0.95)])


def test_served_lac_sets_are_mapies_on_the_same_probabilities(server: tuple[Path, ServerProcess]) -> None:
    """MAPIE calibrated on the manifest's validation scores, asked for the sets of the probabilities served."""
    repository, served = server
    entry = load_manifest(repository / MODEL / "1").conformal.entry("lac")  # type: ignore[union-attr]
    assert entry is not None
    pixels, _ = _images(64, seed=22, noise=20)
    levels = [0.8, 0.9, 0.95]
    results = [_infer(served, pixels, coverage=coverage, conformal_score="lac") for coverage in levels]
    probabilities = results[0].as_numpy("probabilities").astype(np.float64)
    theirs = mapie_lac_sets(np.asarray(entry.calibration), probabilities, levels)
    for index, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("prediction_set"), theirs[:, :, index])


def test_http_json_and_classification_carry_the_sets(server: tuple[Path, ServerProcess]) -> None:
    repository, served = server
    assert served.http_port is not None
    pixels, _ = _images(8, seed=23, noise=40)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{served.http_port}")
    tensor = triton_http.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=False)
    result = client.infer(MODEL, [tensor], parameters={"coverage": 0.99},
                          outputs=[triton_http.InferRequestedOutput(name, binary_data=False)
                                   for name in ("prediction_set", "set_size", "probabilities")])
    chosen = result.as_numpy("prediction_set")
    assert chosen.dtype == np.bool_ and np.array_equal(result.as_numpy("set_size"), chosen.sum(axis=1))
    np.testing.assert_array_equal(chosen, _sets(repository).sets(
        {"probabilities": result.as_numpy("probabilities")}, 0.99, "lac"))
    assert result.get_response()["parameters"]["coverage"] == 0.99
    labels = load_manifest(repository / MODEL / "1").classes
    named = client.infer(MODEL, [tensor], parameters={"coverage": 0.99}, outputs=[
        triton_http.InferRequestedOutput("prediction_set", binary_data=False, class_count=len(labels)),
        triton_http.InferRequestedOutput("probabilities", binary_data=False)])
    strings = named.as_numpy("prediction_set")
    probabilities = named.as_numpy("probabilities")
    for row, kept in zip(strings, chosen, strict=True):
        entries = [(item.decode() if isinstance(item, bytes) else item) for item in row]
        filled = [entry for entry in entries if entry]
        assert len(filled) == kept.sum() and all(not entry for entry in entries[len(filled):])
        indices = [int(entry.split(":")[1]) for entry in filled]
        assert sorted(indices) == np.flatnonzero(kept).tolist()
        assert all(entry.split(":", 2)[2] == labels[index] for entry, index in zip(filled, indices, strict=True))
    assert probabilities.shape == chosen.shape


@pytest.mark.parametrize("coverage", [0, 1.5, -0.1, float("nan"), "most", True, ""])
def test_a_bad_coverage_is_invalid_argument_naming_the_range(server: tuple[Path, ServerProcess],
                                                             coverage: object) -> None:
    pixels, _ = _images(2, seed=24)
    with pytest.raises(InferenceServerException) as error:
        _infer(server[1], pixels, coverage=coverage)
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'coverage'" in str(error.value) and "(0, 1]" in str(error.value)
    if isinstance(coverage, float) and coverage != coverage:
        return  # NaN has no JSON spelling: HTTP clients cannot send it
    http = f"http://127.0.0.1:{server[1].http_port}/v2/models/{MODEL}/infer"
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(pixels.shape), "datatype": "UINT8",
                                   "data": pixels.ravel().tolist()}],
                       "parameters": {"coverage": coverage}}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(http, body, {"Content-Type": "application/json"}), timeout=10)
    assert refused.value.code == 400
    assert "(0, 1]" in json.loads(refused.value.read())["error"]


def test_a_bad_conformal_score_is_invalid_argument(server: tuple[Path, ServerProcess]) -> None:
    pixels, _ = _images(2, seed=25)
    with pytest.raises(InferenceServerException) as error:
        _infer(server[1], pixels, conformal_score="thr")
    assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "lac, aps, raps" in str(error.value)


def test_metadata_and_config_name_the_defaults(server: tuple[Path, ServerProcess]) -> None:
    repository, served = server
    client = triton.InferenceServerClient(served.url)
    metadata = client.get_model_metadata(MODEL)
    outputs = {output.name: (output.datatype, list(output.shape)) for output in metadata.outputs}
    classes = len(load_manifest(repository / MODEL / "1").classes)
    assert outputs["prediction_set"] == ("BOOL", [-1, classes]) and outputs["set_size"] == ("INT64", [-1])
    config = client.get_model_config(MODEL).config
    assert config.parameters["coverage_default"].string_value == "0.9"
    assert config.parameters["conformal_score_default"].string_value == "lac"
    assert config.parameters["conformal_scores"].string_value == "lac,aps,raps"


def test_live_coverage_counts_whether_the_set_held_the_true_class(server: tuple[Path, ServerProcess]) -> None:
    """Labels for answers served with sets at two coverages: the counters equal the coverage computed from the same
    sets and labels."""
    served = server[1]
    before = scraped(served)
    expected: dict[str, tuple[int, int]] = {}
    for coverage, seed in ((0.9, 31), (0.5, 32)):
        pixels, truth = _images(64, seed=seed, noise=45)
        result = _infer(served, pixels, f"sets-{coverage}", coverage=coverage)
        chosen = result.as_numpy("prediction_set")
        accepted = report(served.url, [(f"sets-{coverage}", i, int(c)) for i, c in enumerate(truth)])
        assert accepted == len(truth)
        expected[str(coverage)] = (len(truth), int(chosen[np.arange(len(truth)), truth].sum()))
    after = scraped(served)

    def moved(name: str, coverage: str) -> float:
        key = (name, tuple(sorted({"model": MODEL, "version": "1", "coverage": coverage}.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    for level, (labels, covered) in expected.items():
        assert moved("valley_feedback_sets_total", level) == labels
        assert moved("valley_feedback_set_covered_total", level) == covered
        assert moved("valley_feedback_set_target_total", level) == pytest.approx(labels * float(level))
    assert expected["0.5"][1] < expected["0.9"][1], "the lower coverage's sets hold fewer true classes"
    # A labelled answer served without sets counts in the calibration counters only.
    pixels, truth = _images(4, seed=33)
    plain = triton.InferenceServerClient(served.url).infer(MODEL, triton_inputs(pixels), request_id="no-sets",
                                                           outputs=[triton.InferRequestedOutput("probabilities")])
    assert plain.as_numpy("probabilities").shape[0] == 4
    assert report(served.url, [("no-sets", i, int(c)) for i, c in enumerate(truth)]) == 4
    final = scraped(served)
    assert sum(value for (name, _), value in final.items() if name == "valley_feedback_sets_total") == \
        sum(value for (name, _), value in after.items() if name == "valley_feedback_sets_total")


def test_estimated_accuracy_is_the_validation_map_over_the_window(exported: Path, tmp_path: Path) -> None:
    """A server of its own: its drift window holds only these answers."""
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    drift = load_manifest(repository / MODEL / "1").drift
    assert drift is not None and drift.bin_accuracy is not None and drift.validation_accuracy is not None
    accuracy = AccuracyMap(tuple(drift.bin_accuracy), ())
    served = start_server_process(repository, "--drift-window", str(WINDOW))
    try:
        metrics = scraped(served)
        labels = tuple(sorted({"model": MODEL, "version": "1"}.items()))
        assert metrics[("valley_validation_accuracy", labels)] == pytest.approx(drift.validation_accuracy)
        assert ("valley_estimated_accuracy", labels) not in metrics, "nothing to estimate before an answer"
        confidences = []
        for seed, noise in ((41, 0.0), (42, 60.0)):
            pixels, _ = _images(WINDOW, seed=seed, noise=noise)
            half = WINDOW // 2  # a request takes at most 64 images
            confidences.append(np.concatenate([_infer(served, part).as_numpy("confidence")
                                               for part in (pixels[:half], pixels[half:])]))
            estimated = scraped(served)[("valley_estimated_accuracy", labels)]
            assert estimated == pytest.approx(accuracy.estimate(confidences[-1]), abs=1e-6)
        clean, shifted = (accuracy.estimate(c) for c in confidences)
        assert shifted < clean, "noisy images are less confident: the estimate falls before any label"
    finally:
        stop_server_process(served)


def test_a_version_without_conformal_scores_refuses_coverage(exported: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    path = repository / MODEL / "1" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["conformal"]
    path.write_text(json.dumps(manifest))
    served = start_server_process(repository)
    try:
        pixels, _ = _images(2, seed=51)
        plain = triton.InferenceServerClient(served.url).infer(MODEL, triton_inputs(pixels))
        assert plain.as_numpy("prediction_set") is None and plain.as_numpy("probabilities") is not None
        for parameters in ({"coverage": 0.9}, {"conformal_score": "aps"}):
            with pytest.raises(InferenceServerException) as error:
                triton.InferenceServerClient(served.url).infer(MODEL, triton_inputs(pixels), parameters=parameters)
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT"
            assert "without conformal scores" in str(error.value)
    finally:
        stop_server_process(served)
