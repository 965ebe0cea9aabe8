from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import onnxruntime
import pytest
import torch

from artefact.drift import Baseline, drift_score
from artefact.manifest import OUTPUTS, ManifestError, load_manifest, verify_files
from artefact.metrics import classification_metrics
from artefact.selective import SIGNALS
from artefact.uncertainty import softmax
from tests.conftest import cli
from training import checkpoint
from training.calibrate import fit_temperature, tempered_ensemble_probabilities
from training.config import ExportConfig
from training.data import load_data
from training.engine import build_model, predict_logits
from training.errors import UsageError
from training.export.ensemble import export_ensemble
from training.export.fits import fit_cascade_spec, fit_selective_spec
from training.plots import reliability_bins
from training.runs import RunDir

PLOTS = ["reliability.png", "risk-coverage.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_round_trip_matches_manifest_and_pytorch(exported: Path, fge_run: Path) -> None:
    manifest = load_manifest(exported)
    verify_files(manifest, exported)
    assert manifest.method == "fge" and len(manifest.members) == 3 and manifest.temperature > 0
    # Every snapshot, best first by validation NLL (`--member-order best-first`, the default).
    assert sorted(m.provenance["epoch"] for m in manifest.members) == pytest.approx([4.625, 5.625, 6.625])
    fused = _session(exported / manifest.fused.file)
    samples = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    replayed = fused.run(["probabilities"], {"pixels": samples})[0]
    assert np.max(np.abs(replayed - np.asarray(manifest.samples.probabilities))) <= 1e-4

    # The PyTorch ensemble, rebuilt from the FGE snapshots with the manifest's temperature.
    config = RunDir(fge_run).read_config()
    splits = load_data(config.data)
    logits = []
    for member in json.loads((fge_run / "report.json").read_text())["members"]:
        model = build_model(config.model, splits.info, torch.device("cpu"))
        checkpoint.load_model_weights(model, checkpoint.load(fge_run / member["file"]), config.model, fge_run)
        logits.append(predict_logits(model, splits.test, splits, torch.device("cpu"))[0])
    expected = tempered_ensemble_probabilities(np.stack(logits, axis=1), manifest.temperature)
    pixels = splits.test.images.numpy()  # type: ignore[attr-defined]
    actual = fused.run(["probabilities"], {"pixels": pixels})[0]
    assert np.max(np.abs(actual - expected)) <= 1e-4

    # Each member graph: uint8 pixels in, the member's logits out.
    member = _session(exported / manifest.members[0].file)
    assert member.get_inputs()[0].type == "tensor(uint8)"
    first = round(manifest.members[0].provenance["epoch"] - 4.625)
    assert np.max(np.abs(member.run(None, {"pixels": pixels})[0] - logits[first])) <= 1e-3


def test_members_are_written_best_first_on_validation_unless_asked_as_trained(exported: Path, fge_run: Path,
                                                                             tmp_path: Path) -> None:
    config = RunDir(fge_run).read_config()
    splits = load_data(config.data)
    manifest = load_manifest(exported)
    pixels = splits.val.images.numpy()  # type: ignore[attr-defined]
    labels = splits.val.labels.numpy()  # type: ignore[attr-defined]
    validation_nll = []
    for member in manifest.members:
        logits = _session(exported / member.file).run(None, {"pixels": pixels})[0]
        validation_nll.append(classification_metrics(softmax(logits.astype(np.float64)), labels).nll)
    assert validation_nll == sorted(validation_nll)
    as_trained = json.loads(cli("export", "--from", fge_run, "--name", "synth", "--out", tmp_path,
                                "--member-order", "as-trained").stdout)
    epochs = [m.provenance["epoch"] for m in load_manifest(Path(as_trained["exported"])).members]
    assert epochs == pytest.approx([4.625, 5.625, 6.625])


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_fused_outputs_are_consistent(exported: Path, batch: int) -> None:
    manifest = load_manifest(exported)
    session = _session(exported / "ensemble.onnx")
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    pixels = np.random.default_rng(batch).integers(0, 256, (batch, 1, 16, 16), dtype=np.uint8)
    p, predicted, confidence, entropy, mi, disagreement, members = session.run(None, {"pixels": pixels})
    assert p.shape == (batch, 10) and members.shape == (batch, 3, 10)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(members.mean(axis=1), p, atol=1e-6)
    assert np.array_equal(predicted, p.argmax(axis=1)) and predicted.dtype == np.int64
    np.testing.assert_allclose(confidence, p.max(axis=1), atol=1e-7)
    np.testing.assert_allclose(entropy, -(p * np.log(np.maximum(p, 1e-12))).sum(axis=1), atol=1e-5)
    member_entropy = -(members * np.log(np.maximum(members, 1e-12))).sum(axis=2).mean(axis=1)
    np.testing.assert_allclose(mi, np.maximum(entropy - member_entropy, 0), atol=1e-5)
    expected_disagreement = (members.argmax(axis=2) != predicted[:, None]).mean(axis=1)
    np.testing.assert_allclose(disagreement, expected_disagreement, atol=1e-7)
    assert manifest.outputs[-1].shape == [-1, 3, 10]


def test_temperature_never_worsens_validation_nll(fge_run: Path) -> None:
    config = RunDir(fge_run).read_config()
    splits = load_data(config.data)
    rng = np.random.default_rng(0)
    labels = splits.val.labels.numpy()  # type: ignore[attr-defined]
    logits = rng.normal(size=(2, len(labels), 10)) * 4
    logits[:, np.arange(len(labels)), labels] += 3  # overconfident but informative
    logits = logits.transpose(1, 0, 2)  # [N, K, C], as every function takes member logits
    temperature = fit_temperature(logits, labels)

    def nll(t: float) -> float:
        p = tempered_ensemble_probabilities(logits, t)
        return float(-np.mean(np.log(p[np.arange(len(labels)), labels])))

    assert temperature > 1.0
    assert nll(temperature) <= nll(1.0)
    assert nll(temperature) <= min(nll(temperature * 0.9), nll(temperature * 1.1))


def test_existing_version_needs_overwrite(exported: Path, fge_run: Path) -> None:
    repository = exported.parent.parent
    again = cli("export", "--from", fge_run, "--name", "synth", "--version", "1", "--out", repository, check=False)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    old = load_manifest(exported).created
    result = cli("export", "--from", fge_run, "--name", "synth", "--version", "1", "--out", repository, "--overwrite")
    assert load_manifest(exported).created > old
    assert json.loads(result.stdout)["plots"] == [str(exported / name) for name in PLOTS], "the report names its plots"
    assert sorted(p.name for p in (repository / "synth").iterdir()) == ["1"], "no staging or retired folder left"


def test_failed_export_leaves_nothing(fge_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import training.export.ensemble as export

    def broken(name: str, expected: np.ndarray, actual: np.ndarray) -> float:
        raise RuntimeError(f"{name}: parity broken on purpose")

    monkeypatch.setattr(export, "check_parity", broken)
    with pytest.raises(RuntimeError, match="parity broken"):
        export_ensemble(ExportConfig(runs=[fge_run], name="synth", repository=tmp_path))
    assert list((tmp_path / "synth").iterdir()) == []


def test_bad_sources(synthetic_run: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not a run directory"):
        export_ensemble(ExportConfig(runs=[tmp_path], name="x", repository=tmp_path / "repo"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(synthetic_run, unfinished)
    for path in (unfinished / "checkpoints").iterdir():
        path.unlink()
    with pytest.raises(UsageError, match="no final checkpoint"):
        export_ensemble(ExportConfig(runs=[unfinished], name="x", repository=tmp_path / "repo"))
    other = tmp_path / "other"
    cli("train", "--dataset", "synthetic", "--model", "preresnet20", "--epochs", "1", "--out", other)
    with pytest.raises(UsageError, match=r"one architecture.*'cnn'.*'preresnet20'"):
        export_ensemble(ExportConfig(runs=[synthetic_run, other], name="x", repository=tmp_path / "repo"))


def test_independent_ensemble_of_base_runs(synthetic_run: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    cli("train", "--dataset", "synthetic", "--epochs", "2", "--seed", "9", "--out", second)
    target, manifest = export_ensemble(ExportConfig(runs=[synthetic_run, second], name="independent",
                                                    repository=tmp_path / "repo"))
    assert manifest.method == "independent" and [m.provenance["seed"] for m in manifest.members] == [3, 9]
    verify_files(manifest, target)


def test_manifest_refuses_bad_files(exported: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    payload = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**payload, "schema_version": 99}))
    with pytest.raises(ManifestError, match="schema_version 99 is not supported"):
        load_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({k: v for k, v in payload.items() if k != "temperature"}))
    with pytest.raises(ManifestError, match="temperature"):
        load_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps(payload))
    with open(copy / "member-01.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ManifestError, match=r"member-01\.onnx has sha256"):
        verify_files(load_manifest(copy), copy)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path)


def test_the_manifest_records_an_anytime_ensemble_fitted_within_its_tolerance(exported: Path) -> None:
    manifest = load_manifest(exported)
    cascade = manifest.cascade
    assert cascade is not None and cascade.stages[-1] == len(manifest.members)
    assert cascade.validation.nll <= cascade.validation_full.nll * (1 + cascade.max_nll_increase) + 1e-12
    assert cascade.validation.accuracy >= cascade.validation_full.accuracy - cascade.max_accuracy_drop - 1e-12
    assert cascade.min_gain_kept == 0.9 and cascade.gain_kept_validation is not None
    for kept in (cascade.gain_kept_validation.nll, cascade.gain_kept_validation.ece):
        assert kept is None or kept >= 0.9 - 1e-9
    assert cascade.validation_full.members_per_image == cascade.test_full.members_per_image == len(manifest.members)
    assert 1 <= cascade.test.members_per_image <= len(manifest.members)
    assert cascade.test_full.nll == pytest.approx(manifest.metrics.calibrated.nll, rel=1e-4), \
        "the full ensemble's test NLL is the calibrated ensemble's"


def test_the_cascade_is_fitted_on_validation_only() -> None:
    """Swapping the test split for noise changes the test figures and nothing that was fitted."""
    rng = np.random.default_rng(0)
    members, classes, count = 4, 10, 3000
    labels = rng.integers(0, classes, count)
    margin = rng.uniform(0, 6, count)
    val = rng.normal(0, 1, (members, count, classes))
    val[:, np.arange(count), labels] += margin
    test = val[:, ::-1].copy()
    test_labels = labels[::-1].copy()
    noise = rng.normal(0, 3, test.shape)
    val, test, noise = (logits.transpose(1, 0, 2) for logits in (val, test, noise))  # [N, K, C]
    fitted = fit_cascade_spec(val, labels, test, test_labels, 1.0, 0.01, 0.001, 0.9)
    with_noise = fit_cascade_spec(val, labels, noise, test_labels, 1.0, 0.01, 0.001, 0.9)
    assert (fitted.stages, fitted.thresholds) == (with_noise.stages, with_noise.thresholds)
    assert fitted.validation == with_noise.validation and fitted.test != with_noise.test
    assert fitted.gain_kept_validation == with_noise.gain_kept_validation
    assert fitted.gain_kept_test != with_noise.gain_kept_test
    assert fitted.stages != [members], "informative members agree often enough to exit early"


def test_the_manifest_records_selective_prediction(exported: Path) -> None:
    selective = load_manifest(exported).selective
    assert selective is not None
    assert {curve.signal for curve in selective.curves} == set(SIGNALS) and selective.signal in SIGNALS
    best = min(selective.curves, key=lambda curve: curve.area)
    assert best.signal == selective.signal and best.coverage[-1] == 1.0
    assert [t.target_accuracy for t in selective.thresholds] == [0.95, 0.97, 0.99]
    for threshold in selective.thresholds:
        if threshold.threshold is not None:
            assert threshold.validation_accuracy is not None
            assert threshold.validation_accuracy >= threshold.target_accuracy


def test_selective_thresholds_are_fitted_on_validation_only() -> None:
    """Swapping the test split for noise changes the test figures and nothing that was fitted."""
    rng = np.random.default_rng(1)
    members, classes, count = 4, 10, 4000
    labels = rng.integers(0, classes, count)
    val = rng.normal(0, 1, (members, count, classes))
    val[:, np.arange(count), labels] += rng.uniform(0, 8, count)
    test, test_labels = val[:, ::-1].copy(), labels[::-1].copy()
    val, test = val.transpose(1, 0, 2), test.transpose(1, 0, 2)  # [N, K, C]
    fitted = fit_selective_spec(val, labels, test, test_labels, 1.0)
    with_noise = fit_selective_spec(val, labels, rng.normal(0, 3, test.shape), test_labels, 1.0)
    assert fitted.signal == with_noise.signal and fitted.curves == with_noise.curves
    for a, b in zip(fitted.thresholds, with_noise.thresholds, strict=True):
        assert (a.threshold, a.validation_coverage, a.validation_accuracy) == \
            (b.threshold, b.validation_coverage, b.validation_accuracy)
    assert [t.test_coverage for t in fitted.thresholds] != [t.test_coverage for t in with_noise.thresholds]
    assert any(t.threshold is not None and 0 < t.test_coverage < 1 for t in fitted.thresholds)


def test_the_manifest_records_the_drift_baseline_and_noise_images_drift(exported: Path) -> None:
    manifest = load_manifest(exported)
    drift = manifest.drift
    assert drift is not None and drift.window == 1000 and 0 < drift.clean_level < 0.1
    for fractions in [*drift.histograms.values(), drift.predicted]:
        assert sum(fractions) == pytest.approx(1.0)
    baseline = Baseline.of(drift, len(manifest.classes))
    session = onnxruntime.InferenceSession(str(exported / manifest.fused.file), providers=["CPUExecutionProvider"])
    noise = np.random.default_rng(0).integers(0, 256, (1000, *manifest.input.shape[1:]), dtype=np.uint8)
    names = ["confidence", "entropy", "mutual_information", "predicted_class"]
    answers = dict(zip(names, session.run(names, {"pixels": noise}), strict=True))
    assert drift_score(baseline, answers) > 3 * drift.clean_level, "random pixels are not the validation images"


def test_the_export_draws_its_plots_beside_the_manifest(exported: Path) -> None:
    for name in PLOTS:
        data = (exported / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 10_000 < len(data) < 1_000_000, f"{name}: {len(data)} bytes"
        height, width, _ = matplotlib.image.imread(exported / name).shape
        assert width >= 600 and height >= 400, f"{name} is {width}x{height}"


def test_the_reliability_diagram_has_the_metrics_ece() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 2000)
    logits = rng.normal(0, 2, (2000, 10))
    logits[np.arange(2000), labels] += rng.uniform(0, 5, 2000)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    bins = reliability_bins(probabilities, labels)
    assert bins.count.sum() == 2000 and len(bins.count) == 15
    assert bins.ece == pytest.approx(classification_metrics(probabilities, labels).ece, abs=1e-12)
    filled = bins.count > 0
    assert np.all((bins.confidence[filled] > np.flatnonzero(filled) / 15) &
                  (bins.confidence[filled] <= (np.flatnonzero(filled) + 1) / 15)), "each bin's confidences in it"
    weighted = np.sum(bins.count[filled] * bins.accuracy[filled]) / 2000
    assert weighted == pytest.approx(classification_metrics(probabilities, labels).accuracy)


def test_selective_spec_fits_a_named_signal() -> None:
    """The exporter's plots fit a single network's thresholds on the signal the manifest chose."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 3000)
    val = rng.normal(0, 1, (3, 3000, 10))
    val[:, np.arange(3000), labels] += rng.uniform(0, 8, 3000)
    val = val.transpose(1, 0, 2)  # [N, K, C]
    chosen = fit_selective_spec(val, labels, val, labels, 1.0)
    other = next(name for name in SIGNALS if name != chosen.signal)
    named = fit_selective_spec(val, labels, val, labels, 1.0, signal=other)
    assert named.signal == other and named.curves == chosen.curves
    assert [t.threshold for t in named.thresholds] != [t.threshold for t in chosen.thresholds]


def test_export_writes_the_serving_config_it_is_given_and_refuses_a_wrong_key_before_exporting(
        fge_run: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repository"
    settings = tmp_path / "serving.json"
    settings.write_text(json.dumps({"execution": "members", "instance_group": [{"count": 1}]}))
    refused = cli("export", "--from", fge_run, "--name", "m", "--out", repository, "--config", "max_batch=3",
                  check=False)
    assert refused.returncode == 2 and "unknown key 'max_batch'" in refused.stderr, refused.stderr
    assert not repository.exists(), "nothing is exported under a config the server would refuse"

    result = cli("export", "--from", fge_run, "--name", "m", "--out", repository, "--config", str(settings),
                 "--config", "max_batch_size=16", "--config", "dynamic_batching.preferred_batch_size=[4, 8]",
                 "--config", "members=2")
    written = repository / "m" / "config.json"
    assert json.loads(result.stdout)["config"] == str(written)
    assert json.loads(written.read_text()) == {
        "execution": "members", "instance_group": [{"count": 1}], "max_batch_size": 16,
        "dynamic_batching": {"preferred_batch_size": [4, 8]}, "members": 2}
    # The next export keeps what the file holds and changes only what it is told.
    cli("export", "--from", fge_run, "--name", "m", "--out", repository, "--config", "max_batch_size=32")
    assert json.loads(written.read_text())["max_batch_size"] == 32
    assert json.loads(written.read_text())["execution"] == "members"
    assert sorted(path.name for path in (repository / "m").iterdir()) == ["1", "2", "config.json"]
