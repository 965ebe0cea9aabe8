from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from artefact.cascade import Cascade, fit_cascade, lead, quality, run_cascade
from artefact.manifest import load_manifest
from tests.conftest import cli
from training.data import ImageTensors, load_data
from training.export.fits import tempered_members
from training.runs import RunDir


def _members(count: int = 2000, members: int = 8, classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Member probabilities [N, K, C] that agree on easy images and scatter on hard ones, and the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    hardness = rng.uniform(0, 1, count)
    logits = rng.normal(0, 1, (count, members, classes)) * (0.5 + 2 * hardness[:, None, None])
    logits[np.arange(count), :, labels] += 4 * (1 - hardness)[:, None]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    return probabilities.astype(np.float32), labels


def test_a_threshold_that_keeps_everything_is_the_full_ensemble() -> None:
    probabilities, _ = _members()
    answers, used = run_cascade(probabilities, Cascade((1, 4, 8), (1.01, 1.01)))
    np.testing.assert_allclose(answers, probabilities.mean(axis=1), atol=1e-6)
    assert (used == 8).all()


@pytest.mark.parametrize("first", [1, 3])
def test_a_threshold_that_stops_everything_is_the_prefix_ensemble(first: int) -> None:
    probabilities, _ = _members()
    answers, used = run_cascade(probabilities, Cascade((first, 8), (0.0,)))
    np.testing.assert_allclose(answers, probabilities[:, :first].mean(axis=1), atol=1e-6)
    assert (used == first).all()


def test_images_leave_at_the_first_stage_they_are_confident_at() -> None:
    probabilities, _ = _members()
    cascade = Cascade((1, 3, 8), (0.95, 0.9))
    answers, used = run_cascade(probabilities, cascade)
    first = probabilities[:, 0].max(axis=-1) >= 0.95
    second = ~first & (probabilities[:, :3].mean(axis=1).max(axis=-1) >= 0.9)
    assert (used[first] == 1).all() and (used[second] == 3).all() and (used[~first & ~second] == 8).all()
    np.testing.assert_allclose(answers[second], probabilities[second, :3].mean(axis=1), atol=1e-6)


@pytest.mark.parametrize("members_cascade", [Cascade.full(8), Cascade((1, 4, 8), (0.95, 0.9))])
def test_a_front_that_keeps_no_image_answers_like_the_members_alone(members_cascade: Cascade) -> None:
    probabilities, _ = _members()
    front = _members(seed=7)[0][:, 0]
    expected, used = run_cascade(probabilities, members_cascade)
    for threshold in (1.01, float("inf")):
        answers, cost = run_cascade(probabilities, Cascade(members_cascade.stages, members_cascade.thresholds,
                                                           threshold), front)
        np.testing.assert_array_equal(answers, expected)
        np.testing.assert_array_equal(cost, used + 1)  # the front ran, and costs a member


def test_a_front_answers_the_images_it_is_confident_about_at_the_cost_of_one_member() -> None:
    probabilities, _ = _members()
    front = _members(seed=7)[0][:, 0]
    cascade = Cascade((8,), (), 0.9)
    answers, cost = run_cascade(probabilities, cascade, front)
    confident = front.max(axis=-1) >= 0.9
    assert 0 < confident.sum() < len(front)
    np.testing.assert_array_equal(answers[confident], front[confident])
    np.testing.assert_allclose(answers[~confident], probabilities[~confident].mean(axis=1), atol=1e-6)
    assert (cost[confident] == 1).all() and (cost[~confident] == 9).all()
    everything, all_cost = run_cascade(probabilities, Cascade((8,), (), 0.0), front)
    np.testing.assert_array_equal(everything, front)
    assert (all_cost == 1).all()
    with pytest.raises(ValueError, match="front network"):
        run_cascade(probabilities, cascade)


def test_a_front_is_fitted_where_it_pays_and_left_out_where_it_does_not() -> None:
    probabilities, labels = _members()
    probabilities = probabilities ** 3  # sharper members: about half the ensemble's answers are confident
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    ensemble = probabilities.mean(axis=1)
    # A front that answers like the ensemble itself: the fit puts it first, and it pays.
    good = fit_cascade(probabilities, labels, front_probabilities=ensemble)
    without = fit_cascade(probabilities, labels)
    assert good.cascade.front is not None
    assert good.quality.members_per_image < without.quality.members_per_image
    assert good.quality.nll <= good.full.nll * 1.01 and good.quality.accuracy >= good.full.accuracy - 0.001
    answers, cost = run_cascade(probabilities, good.cascade, ensemble)
    assert quality(answers, labels, cost) == good.quality
    # A front that knows nothing (uniform answers) never leaves an image early and only adds its cost.
    uniform = np.full_like(ensemble, 1 / ensemble.shape[1])
    useless = fit_cascade(probabilities, labels, front_probabilities=uniform)
    assert useless.cascade.front is None and useless.cascade == without.cascade


def test_the_fitted_cascade_is_cheaper_and_within_the_tolerance_on_its_data() -> None:
    probabilities, labels = _members()
    fit = fit_cascade(probabilities, labels, max_nll_increase=0.01, max_accuracy_drop=0.001)
    fitted, full = fit.quality, fit.full
    assert fitted.members_per_image < 0.8 * full.members_per_image, "agreeing members make early exits pay"
    assert fitted.nll <= full.nll * 1.01 and fitted.accuracy >= full.accuracy - 0.001
    answers, used = run_cascade(probabilities, fit.cascade)
    assert quality(answers, labels, used) == fitted


def test_a_tolerance_of_nothing_keeps_the_full_ensemble_or_an_equal_one() -> None:
    probabilities, labels = _members(seed=1)
    fit = fit_cascade(probabilities, labels, max_nll_increase=0.0, max_accuracy_drop=0.0)
    assert fit.quality.nll <= fit.full.nll and fit.quality.accuracy >= fit.full.accuracy


def _sharp_and_blurred_members(count: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five members whose ensemble leads its best member by little on NLL: a wide relative NLL tolerance alone would
    spend the whole lead."""
    probabilities, labels = _members(count, members=5, seed=seed)
    sharpened = probabilities ** 1.5
    return (sharpened / sharpened.sum(axis=-1, keepdims=True)).astype(np.float32), labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cascade_keeps_the_share_of_the_ensembles_lead_it_is_asked_to(seed: int) -> None:
    """With a loose NLL tolerance, the lead over the best single member is what binds: the fit keeps at least 90 %
    of the NLL and of the ECE lead, and without that bound a cheaper cascade gives more of it away."""
    probabilities, labels = _sharp_and_blurred_members(seed=seed)
    gained = lead(probabilities, labels)
    assert gained.member_nll > gained.full.nll and gained.member_ece > gained.full.ece, "the ensemble leads"
    bounded = fit_cascade(probabilities, labels, max_nll_increase=0.2, max_accuracy_drop=0.05, min_gain_kept=0.9)
    unbounded = fit_cascade(probabilities, labels, max_nll_increase=0.2, max_accuracy_drop=0.05, min_gain_kept=0.0)
    nll_kept, ece_kept = bounded.lead.kept(bounded.quality)
    assert nll_kept is not None and nll_kept >= 0.9 and ece_kept is not None and ece_kept >= 0.9
    assert bounded.quality.nll <= gained.full.nll + 0.1 * (gained.member_nll - gained.full.nll) + 1e-12
    assert unbounded.quality.members_per_image < bounded.quality.members_per_image
    assert min(kept for kept in unbounded.lead.kept(unbounded.quality) if kept is not None) < 0.9
    # The shares are the measured ones.
    answers, used = run_cascade(probabilities, bounded.cascade)
    measured = quality(answers, labels, used)
    assert nll_kept == pytest.approx((gained.member_nll - measured.nll) / (gained.member_nll - gained.full.nll))


def test_with_no_lead_on_a_metric_the_cascade_may_not_be_worse_on_it() -> None:
    """Members that are copies of one network: the ensemble leads on nothing, so a cascade may be no worse than the
    full ensemble on NLL and ECE."""
    probabilities, labels = _members(members=1)
    copies = np.repeat(probabilities, 4, axis=1)
    fit = fit_cascade(copies, labels, max_nll_increase=0.5, max_accuracy_drop=0.5)
    assert fit.lead.kept(fit.quality) == (None, None)
    assert fit.quality.nll <= fit.full.nll + 1e-6 and fit.quality.ece <= fit.full.ece + 1e-6


@pytest.mark.parametrize(("stages", "thresholds"), [((), ()), ((8, 4), (0.9,)), ((0, 8), (0.9,)), ((4, 8), ())])
def test_malformed_cascades_are_refused(stages: tuple[int, ...], thresholds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="increasing member counts"):
        Cascade(stages, thresholds)


def test_the_exported_default_keeps_the_ensembles_lead_on_real_images(fashion_fge: Path, tmp_path: Path) -> None:
    """A real Fashion-MNIST FGE ensemble exported with the defaults: its member graphs, run by onnxruntime on the
    validation images, give a default plan that keeps at least 90 % of the full ensemble's NLL and ECE lead over
    its best single member, and the export's report says how much it keeps."""
    result = cli("export", "--from", fashion_fge, "--name", "fashion", "--out", tmp_path)
    reported = json.loads(result.stdout)["cascade"]
    assert reported["min_gain_kept"] == 0.9
    assert reported["gain_kept_validation"]["nll"] >= 0.9 and "nll" in reported["gain_kept_test"]

    version = tmp_path / "fashion" / "1"
    manifest = load_manifest(version)
    assert manifest.cascade is not None
    splits = load_data(RunDir(fashion_fge).read_config().data)
    val = splits.val
    assert isinstance(val, ImageTensors)
    pixels = val.images.numpy()
    logits = np.stack([onnxruntime.InferenceSession(str(version / member.file), providers=["CPUExecutionProvider"])
                       .run(None, {"pixels": pixels})[0] for member in manifest.members], axis=1)
    members = tempered_members(logits, manifest.temperature)
    gained = lead(members, val.labels.numpy())
    assert gained.member_nll > gained.full.nll, "the ensemble leads its best member on NLL"
    answers, used = run_cascade(members, Cascade(tuple(manifest.cascade.stages), tuple(manifest.cascade.thresholds)))
    nll_kept, ece_kept = gained.kept(quality(answers, val.labels.numpy(), used))
    assert nll_kept is not None and nll_kept >= 0.9 - 0.01, "as served (onnxruntime's logits), within float error"
    assert ece_kept is None or ece_kept >= 0.9 - 0.01
    assert nll_kept == pytest.approx(reported["gain_kept_validation"]["nll"], abs=0.01)
    if manifest.cascade.stages != [len(manifest.members)]:
        assert float(np.mean(used)) < len(manifest.members)
