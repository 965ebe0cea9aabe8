"""A front network before the members (`export --front`): exported, checked at load, served, recalibrated.

The synthetic FGE ensemble is exported with its SWA network as the front, at FP32 and INT8. The
served answers are compared with the graphs run in this process and combined by
`artefact.cascade.run_cascade`, the code the export fits and measures the cascade with.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from artefact.cascade import Cascade, run_cascade
from artefact.manifest import load_manifest, verify_files
from artefact.uncertainty import FRONT, outputs_at, softmax
from service.control.recalibrate import publish, suggest
from service.core.ensemble import load_ensemble
from service.feedback import LabelledWindow
from service.launch import ServerProcess
from tests.conftest import cli
from tests.e2e.conftest import MODEL, Reference, start_server_process, stop_server_process
from tests.e2e.test_members import Members, infer

OUTPUTS = ["probabilities", "members_used", "member_probabilities", "mutual_information"]


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _front(version: Path, pixels: np.ndarray) -> np.ndarray:
    """The front graph run here, at its temperature: [N, C]."""
    manifest = load_manifest(version)
    assert manifest.front is not None
    logits = _session(version / manifest.front.file).run(None, {"pixels": pixels})[0]
    probabilities: np.ndarray = softmax(logits / np.float32(manifest.front.temperature))
    return probabilities


@pytest.fixture(scope="module")
def fronted(fge_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fge_run` exported with its SWA network as the front, with an INT8 variant; the version directory."""
    root = tmp_path_factory.mktemp("fronted")
    cli("swa", "--from", fge_run, "--out", root / "swa")
    report = json.loads(cli("export", "--from", fge_run, "--front", root / "swa", "--name", MODEL, "--out",
                            root / "exported", "--precision", "int8").stdout)
    return Path(report["exported"])


@pytest.fixture(scope="module")
def forced(fronted: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fronted` with its cascade's front threshold at the median front confidence of the test images, so that
    about half of them leave with the front's answer whatever the fit found."""
    version = tmp_path_factory.mktemp("forced") / MODEL / "1"
    shutil.copytree(fronted, version)
    confidence = _front(version, _pixels(reference)).max(axis=-1)
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["cascade"]["front"] = float(np.median(confidence))
    (version / "manifest.json").write_text(json.dumps(manifest))
    return version


def _pixels(reference: Reference, count: int = 32) -> np.ndarray:
    return reference.images(count, seed=33)


@pytest.fixture(scope="module")
def server(forced: Path) -> Iterator[ServerProcess]:
    process = start_server_process(forced.parent.parent, "--members", "cascade")
    yield process
    stop_server_process(process)


def _infer(url: str, pixels: np.ndarray, **parameters: object) -> triton.InferResult:
    return infer(url, pixels, OUTPUTS, **parameters)


def test_export_writes_the_front_graph_at_every_precision_and_the_fit_decides(fronted: Path) -> None:
    manifest = load_manifest(fronted)
    verify_files(manifest, fronted)
    front, cascade = manifest.front, manifest.cascade
    assert front is not None and cascade is not None and front.method == "swa" and front.temperature > 0
    assert front.provenance["source_run"].endswith("fge")
    variant = manifest.variant("int8")
    assert variant is not None and variant.front is not None and (fronted / variant.front.file).is_file()
    assert front.file in {entry.file for entry in manifest.files()}
    # Whatever the fit chose, its recorded test figures are what run_cascade makes of the graphs run here.
    splits_pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    np.testing.assert_allclose(_front(fronted, splits_pixels), front.sample_probabilities, atol=1e-5)
    ensemble = load_ensemble(fronted, device="cpu")
    assert ensemble.front_session is not None
    int8 = load_ensemble(fronted, device="cpu", precision="int8")
    assert int8.precision == "int8" and int8.fallback is None and int8.front_session is not None


def test_the_cascade_answers_confident_images_with_the_front(server: ServerProcess, forced: Path,
                                                            reference: Reference) -> None:
    pixels = _pixels(reference)
    manifest = load_manifest(forced)
    assert manifest.cascade is not None and manifest.cascade.front is not None
    members, front = Members(forced)(pixels), _front(forced, pixels)
    cascade = Cascade(tuple(manifest.cascade.stages), tuple(manifest.cascade.thresholds), manifest.cascade.front)
    expected, cost = run_cascade(members, cascade, front)
    by_front = cost == 1
    assert 0 < by_front.sum() < len(pixels), "the test images split between the front and the members"

    result = _infer(server.url, pixels)
    used = result.as_numpy("members_used")
    np.testing.assert_array_equal(used == FRONT, by_front)
    np.testing.assert_array_equal(used[~by_front], cost[~by_front] - 1)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    served_members = result.as_numpy("member_probabilities")
    assert not served_members[by_front].any(), "no member ran for an image the front answered"
    assert not result.as_numpy("mutual_information")[by_front].any(), "one network: no disagreement"

    alone = _infer(server.url, pixels, members="front")
    assert alone.as_numpy("members_used").tolist() == [FRONT] * len(pixels)
    np.testing.assert_allclose(alone.as_numpy("probabilities"), front, atol=1e-5)
    full = _infer(server.url, pixels, members="full")
    np.testing.assert_allclose(full.as_numpy("probabilities"), members.mean(axis=1), atol=1e-5)

    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counted = sum(float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith("valley_front_images_total{"))
    assert counted == 2 * len(pixels), "the cascade's and the front-only request's images ran through the front"


def test_a_front_that_keeps_no_image_answers_like_the_members(forced: Path, reference: Reference) -> None:
    pixels = _pixels(reference)
    ensemble = load_ensemble(forced, device="cpu")
    stages = (1, len(ensemble.manifest.members))
    without = ensemble.infer(pixels, ["probabilities", "members_used"], Cascade(stages, (0.9,)))
    never = ensemble.infer(pixels, ["probabilities", "members_used"], Cascade(stages, (0.9,), front=1.5))
    np.testing.assert_array_equal(never["probabilities"], without["probabilities"])
    np.testing.assert_array_equal(never["members_used"], without["members_used"])


def test_a_version_without_a_front_refuses_members_front(exported: Path, tmp_path: Path,
                                                         reference: Reference) -> None:
    shutil.copytree(exported, tmp_path / "repository" / MODEL / "1")
    process = start_server_process(tmp_path / "repository", "--members", "front")
    try:
        # The server's default `front` falls back to the cascade for a version without one ...
        result = _infer(process.url, _pixels(reference, 2))
        assert (result.as_numpy("members_used") >= 1).all()
        # ... and a request that names it is told why.
        with pytest.raises(InferenceServerException) as caught:
            _infer(process.url, _pixels(reference, 2), members="front")
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "has none" in str(caught.value.message()) and "--front" in str(caught.value.message())
    finally:
        stop_server_process(process)


def test_recalibration_scales_the_front_with_the_members(forced: Path, reference: Reference,
                                                         tmp_path: Path) -> None:
    folder = tmp_path / MODEL
    shutil.copytree(forced, folder / "1")
    ensemble = load_ensemble(folder / "1", device="cpu")
    manifest = ensemble.manifest
    assert manifest.front is not None and manifest.cascade is not None
    pixels = _pixels(reference, 64)
    plan = Cascade(tuple(manifest.cascade.stages), tuple(manifest.cascade.thresholds), manifest.cascade.front)
    served = ensemble.infer(pixels, ["probabilities", "member_probabilities", "members_used"], plan)
    assert (served["members_used"] == FRONT).any()
    labels = np.random.default_rng(5).integers(0, 10, len(pixels))  # labels at random: the fit flattens
    window = LabelledWindow(served["probabilities"], served["member_probabilities"], served["members_used"], labels)
    # As served, the front's rows are recomputed from the served probabilities.
    np.testing.assert_allclose(outputs_at(window.members, window.used, 1.0, window.probabilities)["probabilities"],
                               served["probabilities"], atol=1e-6)
    suggestion = suggest(window, manifest.temperature)
    assert suggestion is not None and suggestion.suggested > manifest.temperature
    published = publish(folder / "1", suggestion.suggested, suggestion, suggestion.suggested_metrics)
    child = load_ensemble(published, device="cpu")  # its samples check runs the front graph at its new temperature
    assert child.manifest.front is not None
    assert child.manifest.front.temperature == pytest.approx(
        manifest.front.temperature * suggestion.suggested / manifest.temperature)
    # The child's front answers at the parent's front temperature scaled by the fitted ratio, as its members do.
    alone = Cascade((1,), (), front=0.0)
    child_front = child.infer(pixels, ["probabilities", "members_used"], alone)
    assert (child_front["members_used"] == FRONT).all()
    np.testing.assert_allclose(child_front["probabilities"], _front(published, pixels), atol=1e-6)
    logits = _session(published / manifest.front.file).run(None, {"pixels": pixels})[0].astype(np.float64)
    scaled = manifest.front.temperature * suggestion.suggested / manifest.temperature
    np.testing.assert_allclose(child_front["probabilities"], softmax(logits / scaled), atol=1e-5)


@pytest.mark.parametrize(("which", "message"), [
    ("base", "--front takes an SWA or distilled run"),
    ("missing", "does not exist"),
])
def test_export_refuses_a_front_it_cannot_use(which: str, message: str, fge_run: Path, synthetic_run: Path,
                                              tmp_path: Path) -> None:
    front = {"base": synthetic_run, "missing": tmp_path / "no-such-run"}[which]
    result = cli("export", "--from", fge_run, "--front", front, "--name", MODEL, "--out", tmp_path / "repository",
                 check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "repository" / MODEL / "1").exists()


def test_a_manifest_whose_front_does_not_add_up_is_refused(fronted: Path) -> None:
    manifest = load_manifest(fronted)
    assert manifest.front is not None and manifest.cascade is not None
    data = manifest.model_dump(mode="json")
    cascade_only = {**data, "front": None, "variants": [], "cascade": {**data["cascade"], "front": 0.9}}
    with pytest.raises(ValueError, match="a front threshold needs the manifest's front network"):
        type(manifest).model_validate(cascade_only)
    variant_without = {**data, "variants": [{**variant, "front": None} for variant in data["variants"]]}
    with pytest.raises(ValueError, match="every variant holds the front network"):
        type(manifest).model_validate(variant_without)
    rows = data["front"]["sample_probabilities"][:1]
    wrong_samples = {**data, "front": {**data["front"], "sample_probabilities": rows}}
    with pytest.raises(ValueError, match="one sample probability row per sample input"):
        type(manifest).model_validate(wrong_samples)
    for threshold in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            type(manifest).model_validate({**data, "cascade": {**data["cascade"], "front": threshold}})
