"""Stochastic weight averaging of FGE snapshots (`valley-train swa`): the average, batch norm recomputed, the run
and its export as a one-network model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from artefact.manifest import load_manifest
from tests.conftest import cli
from training import checkpoint
from training.config import DataConfig
from training.curve_train import batch_norm_batches
from training.curves import recompute_batch_norm
from training.data import load_data
from training.engine import build_model
from training.runs import RunDir, SWAReport
from training.swa import average_snapshots

CPU = torch.device("cpu")


def _snapshot(fge_run: Path, index: int) -> Path:
    return fge_run / "snapshots" / f"member-{index:02d}.pt"


def test_the_average_of_identical_snapshots_is_the_snapshot_with_batch_norm_recomputed(fge_run: Path) -> None:
    splits = load_data(DataConfig(dataset="synthetic"))
    path = _snapshot(fge_run, 1)
    averaged, images = average_snapshots("cnn", splits, [path, path, path], CPU, 128)
    alone = build_model("cnn", splits.info, CPU)
    checkpoint.load_model_weights(alone, checkpoint.load(path), "cnn", path)
    snapshot_state = {name: tensor.clone() for name, tensor in alone.state_dict().items()}
    assert recompute_batch_norm(alone, batch_norm_batches(splits, 128, CPU)) == images == len(splits.train)
    expected, actual = alone.state_dict(), averaged.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name
    # The statistics are the recomputed ones, not the snapshot's own.
    assert not torch.equal(snapshot_state["network.1.running_mean"], actual["network.1.running_mean"])


def test_the_average_of_two_snapshots_is_the_mean_of_their_weights(fge_run: Path) -> None:
    splits = load_data(DataConfig(dataset="synthetic"))
    first, second = (checkpoint.load(_snapshot(fge_run, index))["model"] for index in (0, 2))
    averaged, _ = average_snapshots("cnn", splits, [_snapshot(fge_run, 0), _snapshot(fge_run, 2)], CPU, 128)
    parameters = dict(averaged.named_parameters())
    assert parameters
    for name, parameter in parameters.items():
        torch.testing.assert_close(parameter.detach(), (first[name] + second[name]) / 2, rtol=0, atol=1e-7)


def test_swa_runs_from_an_fge_run_and_exports_as_one_network(fge_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "swa"
    result = cli("swa", "--from", fge_run, "--members", "2", "--out", out)
    assert "SWA of the 2 snapshots" in result.stdout
    report = RunDir(out).read_report(SWAReport)
    assert report.config.members == [0, 1] and report.ensemble.size == 2
    assert report.batch_norm_images > 0 and report.test.count > 0
    assert (out / "network.pt").is_file() and RunDir(out).is_swa and RunDir(out).kind_in_words == "an SWA"
    exported = json.loads(cli("export", "--from", out, "--name", "swa", "--out", tmp_path / "repository").stdout)
    manifest = load_manifest(Path(exported["exported"]))
    assert manifest.method == "swa" and len(manifest.members) == 1
    assert manifest.members[0].provenance["averaged"] == [0, 1]
    # The exported graph is the averaged network, batch norm recomputed: its test accuracy is the report's.
    assert manifest.metrics.uncalibrated.accuracy == pytest.approx(report.test.accuracy)


@pytest.mark.parametrize(("source", "extra", "message"), [
    ("base", [], "is a base run: SWA averages the snapshots of an FGE or SSE run"),
    ("missing", [], "does not exist: it is not a valley run directory"),
    ("fge", ["--members", "0"], "--members must be between 1 and the run's 3 snapshots"),
    ("fge", ["--members", "4"], "--members must be between 1 and the run's 3 snapshots"),
])
def test_swa_refuses_what_it_cannot_average(source: str, extra: list[str], message: str, synthetic_run: Path,
                                            fge_run: Path, tmp_path: Path) -> None:
    runs = {"base": synthetic_run, "fge": fge_run, "missing": tmp_path / "no-such-run"}
    result = cli("swa", "--from", runs[source], *extra, "--out", tmp_path / "swa", check=False)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_swa_run_is_exported_alone_and_is_no_base_run(fge_run: Path, synthetic_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "swa"
    cli("swa", "--from", fge_run, "--out", out)
    mixed = cli("export", "--from", out, synthetic_run, "--name", "mixed", "--out", tmp_path / "repository",
                check=False)
    assert mixed.returncode == 2 and "export it alone" in mixed.stderr
    fge = cli("fge", "--from", out, "--out", tmp_path / "fge", check=False)
    assert fge.returncode == 2 and "is an SWA run" in fge.stderr
    again = cli("swa", "--from", fge_run, "--out", out, check=False)
    assert again.returncode == 2 and "already holds an SWA run" in again.stderr
