"""Curves between trained networks: the coefficients, the weights at t, batch norm, training, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from artefact.manifest import load_manifest, verify_files
from service.core.ensemble import load_ensemble
from tests.conftest import cli
from training import checkpoint
from training.curve_train import batch_norm_batches, open_curve
from training.curves import Curve, curve_coefficients, recompute_batch_norm
from training.data import load_data
from training.engine import build_model, predict_logits
from training.runs import CurveReport, RunDir

TS = [i / 200 for i in range(201)] + [1e-9, 0.3333333, 0.5 - 1e-12, 0.5 + 1e-12, 1 - 1e-9]


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
@pytest.mark.parametrize("points", [2, 3, 4, 7])
def test_coefficients_sum_to_one_and_are_not_negative(kind: str, points: int) -> None:
    for t in TS:
        c = curve_coefficients(kind, t, points)  # type: ignore[arg-type]
        assert c.shape == (points,)
        assert float(c.sum()) == pytest.approx(1.0, abs=1e-12), (kind, points, t)
        assert bool((c >= 0).all()), (kind, points, t)
    ends = [curve_coefficients(kind, t, points).tolist() for t in (0.0, 1.0)]  # type: ignore[arg-type]
    assert ends == [[1.0] + [0.0] * (points - 1), [0.0] * (points - 1) + [1.0]]


def test_one_bend_curves_follow_the_paper() -> None:
    for t in TS:
        assert curve_coefficients("bezier", t, 3).tolist() == pytest.approx([(1 - t) ** 2, 2 * t * (1 - t), t**2])
        # Polychain with one bend: 2(t theta + (0.5 - t) w1) for t <= 0.5, 2((t - 0.5) w2 + (1 - t) theta) after.
        expected = [2 * (0.5 - t), 2 * t, 0.0] if t <= 0.5 else [0.0, 2 * (1 - t), 2 * (t - 0.5)]
        assert curve_coefficients("polychain", t, 3).tolist() == pytest.approx(expected)
    with pytest.raises(ValueError, match=r"t must be in \[0, 1\]"):
        curve_coefficients("bezier", 1.5, 3)


def _network(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def test_bends_start_on_the_line_and_gradients_reach_only_them() -> None:
    start, end = _network(1).state_dict(), _network(2).state_dict()
    curve = Curve(_network(3), start, end, "polychain", bends=3).train()
    for k, share in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):
        weight = curve.control_point(k)["0.weight"]
        assert torch.allclose(weight, (1 - share) * start["0.weight"] + share * end["0.weight"], atol=1e-7)
    curve(torch.rand(5, 1, 8, 8)).sum().backward()
    ends = [*curve.control_point(0).values(), *curve.control_point(4).values()]
    assert all(p.grad is None and not p.requires_grad for p in ends)
    assert all(p.grad is None for p in curve.network.parameters()), "the template's own weights are never used"
    bends = curve.bend_parameters()
    assert len(bends) == 3 * len(list(curve.network.parameters()))
    assert sum(1 for p in bends if p.grad is not None and p.grad.abs().sum() > 0) >= len(bends) // 3
    assert {id(p) for p in bends} == {id(p) for p in curve.parameters() if p.requires_grad}


def test_weights_at_t_are_the_control_points_combined() -> None:
    start, end = _network(1).state_dict(), _network(2).state_dict()
    curve = Curve(_network(3), start, end, "bezier", bends=1)
    with torch.no_grad():
        curve.control_point(1)["0.weight"].add_(1.0)  # move the bend off the line
    for t in (0.0, 0.3, 1.0):
        (a, b, c) = curve_coefficients("bezier", t, 3).tolist()
        expected = a * start["0.weight"] + b * curve.control_point(1)["0.weight"] + c * end["0.weight"]
        assert torch.allclose(curve.weights(t)["0.weight"], expected, atol=1e-6)
    assert torch.equal(curve.weights(0.0)["0.weight"], start["0.weight"]), "t = 0 is the start, bit for bit"
    assert torch.equal(curve.weights(1.0)["4.bias"], end["4.bias"])


def test_buffers_other_than_batch_norm_follow_the_endpoints() -> None:
    class Scaled(nn.Module):
        scale: torch.Tensor

        def __init__(self, scale: float) -> None:
            super().__init__()
            self.linear = nn.Linear(2, 2)
            self.register_buffer("scale", torch.tensor(scale))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) * self.scale  # type: ignore[no-any-return]

    curve = Curve(Scaled(0.0), Scaled(2.0).state_dict(), Scaled(4.0).state_dict(), "bezier", bends=1)
    assert [float(curve.network_at(t).get_buffer("scale")) for t in (0.0, 0.5, 1.0)] == [2.0, 3.0, 4.0]


def test_batch_norm_recomputation_keeps_dropout_off() -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Dropout(0.5), nn.BatchNorm1d(3)).train()
    images = torch.rand(64, 3) + 1.0
    recompute_batch_norm(network, [images[:32], images[32:]])
    layer = network[1]
    assert isinstance(layer, nn.BatchNorm1d) and layer.running_mean is not None
    assert torch.allclose(layer.running_mean, images.mean(dim=0), atol=1e-6), "dropout must not thin the pass"
    assert network.training and network[0].training, "the modes are restored"


def test_batch_norm_is_the_exact_average_over_uneven_batches() -> None:
    layer = nn.BatchNorm2d(2)
    network = nn.Sequential(layer, nn.Flatten()).eval()
    images = torch.rand(37, 2, 3, 3) * torch.tensor([1.0, 5.0]).view(1, 2, 1, 1)
    batches = [images[:16], images[16:32], images[32:]]  # the last batch is short
    assert layer.running_mean is not None
    layer.running_mean.fill_(100.0)
    assert recompute_batch_norm(network, batches) == 37
    assert torch.allclose(layer.running_mean, images.mean(dim=(0, 2, 3)), atol=1e-6)
    assert layer.momentum == 0.1 and not network.training


def _curve_run(start: Path, end: Path, out: Path, *options: str) -> Path:
    cli("curve", "--start", start, "--end", end, "--out", out, *options)
    return out


@pytest.fixture(scope="module")
def second_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second base run like `synthetic_run`, from another seed."""
    run = tmp_path_factory.mktemp("second") / "base"
    cli("train", "--dataset", "synthetic", "--epochs", "5", "--seed", "8", "--out", run)
    return run


@pytest.fixture(scope="module")
def curve_run(synthetic_run: Path, second_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _curve_run(synthetic_run, second_run, tmp_path_factory.mktemp("curve") / "curve", "--epochs", "3")


@pytest.mark.parametrize("kind", ["bezier", "polychain"])
def test_endpoints_of_a_trained_curve_are_the_networks(synthetic_run: Path, second_run: Path, tmp_path: Path,
                                                       kind: str) -> None:
    curve_dir = _curve_run(synthetic_run, second_run, tmp_path / kind, "--curve", kind, "--epochs", "2",
                           "--bends", "2")
    trained = open_curve(curve_dir, "cpu")
    splits, device = trained.splits, torch.device("cpu")
    for t, run in ((0.0, synthetic_run), (1.0, second_run)):
        final = RunDir(run).epoch_checkpoint(5)
        network = build_model("cnn", splits.info, device)
        checkpoint.load_model_weights(network, checkpoint.load(final), "cnn", final)
        recompute_batch_norm(network, batch_norm_batches(splits, 128, device))
        expected = predict_logits(network, splits.test, splits, device)[0]
        actual = predict_logits(trained.network_at(t), splits.test, splits, device)[0]
        assert np.max(np.abs(actual - expected)) <= 1e-5, (kind, t)
    # The bends moved: the middle of the curve is no longer the middle of the line.
    middle, line_middle = trained.curve.weights(0.5), trained.curve.line().weights(0.5)
    assert any(not torch.allclose(middle[n], line_middle[n]) for n in middle)


def test_curve_eval_reports_the_curve_and_the_line(curve_run: Path) -> None:
    result = cli("curve-eval", curve_run, "--points", "5")
    report = CurveReport.model_validate_json((curve_run / "report.json").read_text())
    evaluation = report.evaluation
    assert evaluation is not None and [p.t for p in evaluation.points] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert evaluation.points[0].curve == evaluation.points[0].line
    assert evaluation.points[2].curve != evaluation.points[2].line
    assert evaluation.batch_norm_images == 1000
    assert evaluation.line_max_test_error == max(1 - p.line.test.accuracy for p in evaluation.points)
    assert report.start is not None and report.start.test.count == 500
    assert (curve_run / "plots" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 0.500 |" in result.stdout and "line max" in result.stdout


def test_curve_export_is_served_like_fge(curve_run: Path, tmp_path: Path) -> None:
    result = cli("export", "--from", curve_run, "--points", "0.25,0.5,0.75", "--name", "curve", "--out", tmp_path,
                 "--member-order", "as-trained")
    printed = json.loads(result.stdout)
    manifest = load_manifest(tmp_path / "curve" / "1")
    verify_files(manifest, tmp_path / "curve" / "1")
    assert manifest.method == "curve" and [m.provenance["t"] for m in manifest.members] == [0.25, 0.5, 0.75]
    names = [row["name"] for row in printed["comparison"]]
    assert names[0] == "curve ensemble (3 points)" and "endpoint ensemble (2 networks)" in names
    assert {"start network alone", "end network alone"} <= set(names)
    ensemble = load_ensemble(tmp_path / "curve" / "1")
    assert ensemble.check_samples() <= 1e-4

    # The members are the curve's points with batch norm recomputed, exported faithfully.
    trained = open_curve(curve_run, "cpu")
    logits = predict_logits(trained.network_at(0.5), trained.splits.test, trained.splits, torch.device("cpu"))[0]
    import onnxruntime

    member = onnxruntime.InferenceSession(str(tmp_path / "curve" / "1" / manifest.members[1].file),
                                          providers=["CPUExecutionProvider"])
    pixels = trained.splits.test.images.numpy()  # type: ignore[attr-defined]
    assert np.max(np.abs(member.run(None, {"pixels": pixels})[0] - logits)) <= 1e-3


def test_curve_resume_after_kill_is_bit_identical(synthetic_run: Path, second_run: Path, tmp_path: Path) -> None:
    from tests.test_resume import _assert_same, _kill_after, _weights

    args = ["curve", "--start", str(synthetic_run), "--end", str(second_run), "--epochs", "6", "--seed", "4"]
    cli(*args, "--out", tmp_path / "straight")
    killed = tmp_path / "killed"
    _kill_after([*args, "--out", str(killed)], killed / "log.jsonl", lines=2)
    assert not (killed / "report.json").exists()
    cli(*args, "--out", killed, "--resume")
    _assert_same(_weights(tmp_path / "straight" / "checkpoints" / "last.pt"),
                 _weights(killed / "checkpoints" / "last.pt"))
    changed = cli(*args[:-2], "--seed", "5", "--out", killed, "--resume", check=False)
    assert changed.returncode == 2 and "started with other options" in changed.stderr


def test_endpoints_that_do_not_match_are_one_line_errors(synthetic_run: Path, fge_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    cli("train", "--dataset", "synthetic", "--model", "preresnet20", "--epochs", "1", "--out", other)
    cases = {
        "one architecture": other,
        "same dataset and split": tmp_path / "subset",
        "is an FGE run": fge_run,
        "same run": synthetic_run,
        "not a run directory": tmp_path / "missing",
    }
    cli("train", "--dataset", "synthetic", "--subset", "300", "--epochs", "1", "--out", tmp_path / "subset")
    for message, end in cases.items():
        result = cli("curve", "--start", synthetic_run, "--end", end, "--out", tmp_path / "curve", check=False)
        assert result.returncode == 2, (message, result.stderr)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "curve").exists()


def test_export_needs_points_for_a_curve_and_a_curve_for_points(curve_run: Path, synthetic_run: Path,
                                                                 tmp_path: Path) -> None:
    for args, message in (([curve_run], "--num-points K"), ([curve_run, "--points", "0.5,0.5"], "a t twice"),
                          ([curve_run, "--points", "-0.1"], "must lie in [0, 1]"),
                          ([synthetic_run, "--num-points", "3"], "must be a curve run")):
        result = cli("export", "--from", *args, "--name", "x", "--out", tmp_path, check=False)
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_a_torchvision_resnet18_curve_trains_and_exports(tmp_path: Path) -> None:
    runs = []
    for seed in (1, 2):
        run = tmp_path / f"resnet-{seed}"
        cli("train", "--dataset", "synthetic", "--subset", "256", "--model", "torchvision:resnet18", "--epochs", "1",
            "--seed", str(seed), "--out", run)
        runs.append(run)
    curve = _curve_run(runs[0], runs[1], tmp_path / "curve", "--epochs", "1")
    before = checkpoint.load(RunDir(curve).epoch_checkpoint(1))["model"]
    assert "points.1.network:fc:weight" in before, "the checkpoint holds the bend's parameters by name"
    middle = open_curve(curve, "cpu")
    line = middle.curve.line().weights(0.5)
    assert any(not torch.allclose(middle.curve.weights(0.5)[n], line[n]) for n in line), "the bend trained"
    cli("export", "--from", curve, "--num-points", "2", "--name", "resnet", "--out", tmp_path / "repo")
    version = tmp_path / "repo" / "resnet" / "1"
    manifest = load_manifest(version)
    verify_files(manifest, version)
    assert manifest.model == "torchvision:resnet18" and len(manifest.members) == 2
    assert load_ensemble(version).check_samples() <= 1e-4
    assert load_data(RunDir(curve).read_config().data).info.name == "synthetic"


def test_runs_of_the_wrong_kind_are_one_line_errors(curve_run: Path, synthetic_run: Path, tmp_path: Path) -> None:
    cases: list[tuple[list[str | Path], str]] = [
        (["fge", "--from", curve_run, "--cycles", "1", "--out", tmp_path / "fge"], "is a curve run"),
        (["curve", "--start", curve_run, "--end", synthetic_run, "--out", tmp_path / "c"], "is a curve run"),
        (["curve-eval", synthetic_run], "is not a curve run"),
        (["curve-eval", tmp_path / "nowhere"], "is not a curve run"),
        (["curve-eval", curve_run, "--points", "1"], "--points must be between 2"),
        (["curve", "--start", synthetic_run, "--end", curve_run, "--bends", "0", "--out", tmp_path / "c"],
         "--bends"),
        (["curve", "--start", synthetic_run, "--end", curve_run, "--bends", "33", "--out", tmp_path / "c"],
         "--bends"),
        (["curve", "--start", synthetic_run, "--end", curve_run, "--lr", "inf", "--out", tmp_path / "c"],
         "--lr: Input should be a finite number"),
        (["curve-eval", curve_run, "--device", "meta"], "unsupported device 'meta'"),
        (["curve-eval", tmp_path / "garbage"], "holds no JSON object"),
        (["export", "--from", tmp_path / "garbage", "--name", "x", "--out", tmp_path / "repo"], "holds no JSON object"),
    ]
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("[1, 2]")
    for args, message in cases:
        result = cli(*args, check=False)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_trained_curve_needs_nothing_of_its_endpoint_runs(tmp_path: Path) -> None:
    import shutil

    for seed in (1, 2):
        cli("train", "--dataset", "synthetic", "--epochs", "2", "--seed", str(seed), "--out", tmp_path / f"b{seed}")
    curve = _curve_run(tmp_path / "b1", tmp_path / "b2", tmp_path / "curve", "--epochs", "1")
    before = open_curve(curve, "cpu")
    expected = predict_logits(before.network_at(0.5), before.splits.test, before.splits, torch.device("cpu"))[0]
    shutil.rmtree(tmp_path / "b1")
    shutil.rmtree(tmp_path / "b2")
    after = open_curve(curve, "cpu")
    actual = predict_logits(after.network_at(0.5), after.splits.test, after.splits, torch.device("cpu"))[0]
    assert np.array_equal(actual, expected)
    result = cli("export", "--from", curve, "--num-points", "2", "--name", "c", "--out", tmp_path / "repo")
    rows = {row["name"]: row for row in json.loads(result.stdout)["comparison"]}
    assert rows["start network alone"]["test"]["count"] == 500
