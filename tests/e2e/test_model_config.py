"""Per-model configuration: each ensemble's config.json over the server's flags, reported by ModelConfig.

Two ensembles of one repository are served with different settings (batch size, members,
execution, batching, instances), each reported over gRPC and HTTP as it is served; a third with
an unknown key is refused alone, with the key in the repository index; a changed file applies on
the next load.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from service.launch import start_server
from tests.conftest import REPO
from tests.e2e.conftest import Reference, scraped, triton_inputs

SMALL, WIDE, BROKEN = "small", "wide", "broken"


def _copy(exported: Path, repository: Path, name: str, config: dict[str, Any] | str | None) -> None:
    shutil.copytree(exported, repository / name / "1")
    manifest_path = repository / name / "1" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["name"] = name
    manifest_path.write_text(json.dumps(manifest))
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (repository / name / "config.json").write_text(text)


SMALL_CONFIG = {
    "name": SMALL, "platform": "valley_ensemble", "max_batch_size": 4, "members": "1", "execution": "members",
    "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    "dynamic_batching": {"preferred_batch_size": [4, 2], "max_queue_delay_microseconds": "500",
                         "default_queue_policy": {"max_queue_size": 16, "default_timeout_microseconds": 250000}},
    "calibration_window": 50, "drift_window": 64, "degrade_queue_ms": 0,
}
WIDE_CONFIG = {"max_batch_size": 16, "members": "full", "execution": "fused"}


@pytest.fixture
def configured(exported: Path, tmp_path: Path) -> Path:
    repository = tmp_path / "repository"
    _copy(exported, repository, SMALL, SMALL_CONFIG)
    _copy(exported, repository, WIDE, WIDE_CONFIG)
    _copy(exported, repository, BROKEN, {"max_batch": 8, "dynamic_batching": {"max_queue_delay_microseconds": -1}})
    return repository


def _index(client: triton.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def _parameters(config: dict[str, Any]) -> dict[str, str]:
    return {key: value["string_value"] for key, value in config["parameters"].items()}


def test_each_ensemble_is_served_and_reported_with_its_own_config(configured: Path, tmp_path: Path,
                                                                   reference: Reference) -> None:
    server = start_server(configured, "--degrade-queue-ms", "0", log=tmp_path / "serve.log", cwd=REPO,
                          env={"OMP_NUM_THREADS": "2", "XDG_STATE_HOME": str(tmp_path / "state")}, timeout=120)
    try:
        grpc_client = triton.InferenceServerClient(server.url)
        http_client = triton_http.InferenceServerClient(server.http_url)
        members = len(json.loads((configured / SMALL / "1" / "manifest.json").read_text())["members"])

        # The broken one is refused alone, each wrong key named; the server is not ready until it loads.
        state, reason = _index(grpc_client)[BROKEN]
        assert state == "UNAVAILABLE"
        assert "broken/config.json" in reason and "unknown key 'max_batch'" in reason, reason
        assert "dynamic_batching.max_queue_delay_microseconds" in reason, reason
        assert not grpc_client.is_server_ready()
        assert grpc_client.is_model_ready(SMALL) and grpc_client.is_model_ready(WIDE)
        assert not grpc_client.is_model_ready(BROKEN)

        for transport in ("grpc", "http"):
            small, wide = (grpc_client.get_model_config(name, as_json=True)["config"] if transport == "grpc"
                           else http_client.get_model_config(name) for name in (SMALL, WIDE))
            assert small["max_batch_size"] == 4 and wide["max_batch_size"] == 16
            batching = small["dynamic_batching"]
            assert batching["preferred_batch_size"] == [2, 4]
            assert int(batching["max_queue_delay_microseconds"]) == 500
            assert int(batching["default_queue_policy"]["max_queue_size"]) == 16
            assert int(batching["default_queue_policy"]["default_timeout_microseconds"]) == 250000
            assert small["instance_group"][0]["count"] == 1 and small["instance_group"][0]["kind"] == "KIND_CPU"
            assert wide["instance_group"][0]["count"] == 2, "the server's --instances where the file is silent"
            assert wide["dynamic_batching"]["preferred_batch_size"] == [16]
            assert int(wide["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000
            assert _parameters(small)["execution"] == "members" and _parameters(wide)["execution"] == "fused"
            assert _parameters(small)["members_default"] == "1" and _parameters(wide)["members_default"] == "full"
            assert _parameters(small)["calibration_window"] == "50" and _parameters(small)["drift_window"] == "64"
            assert _parameters(wide)["calibration_window"] == "1000"
            assert small["version_policy"] == {"latest": {"num_versions": 1}}

        # Served as configured: the batch bound and the default members differ per ensemble.
        pixels = reference.images(5, seed=3)
        with pytest.raises(InferenceServerException, match="'small' takes at most 4 per request"):
            grpc_client.infer(SMALL, triton_inputs(pixels))
        used_small = grpc_client.infer(SMALL, triton_inputs(pixels[:4])).as_numpy("members_used")
        used_wide = grpc_client.infer(WIDE, triton_inputs(pixels)).as_numpy("members_used")
        assert used_small is not None and used_wide is not None
        assert np.all(used_small == 1) and np.all(used_wide == members)
        assert scraped(server)[("valley_drift_window_size_images", (("model", SMALL), ("version", "1")))] == 64

        # A changed file applies at the next load: the broken one is mended, the small one widened.
        (configured / BROKEN / "config.json").write_text(json.dumps({"max_batch_size": 8}))
        (configured / SMALL / "config.json").write_text(json.dumps({**SMALL_CONFIG, "max_batch_size": 8}))
        grpc_client.load_model(BROKEN)
        grpc_client.load_model(SMALL)
        assert http_client.get_model_config(BROKEN)["max_batch_size"] == 8
        assert grpc_client.get_model_config(SMALL, as_json=True)["config"]["max_batch_size"] == 8
        assert grpc_client.infer(SMALL, triton_inputs(pixels)).as_numpy("members_used") is not None
        assert grpc_client.is_server_ready()

        # A bad value refuses the load, names the key, and what served keeps serving.
        (configured / SMALL / "config.json").write_text(json.dumps({"max_batch_size": 0, "members": "some"}))
        with pytest.raises(InferenceServerException, match="max_batch_size") as refused:
            grpc_client.load_model(SMALL)
        assert "'some'" in str(refused.value) and "version 1 keeps serving" in str(refused.value)
        assert grpc_client.get_model_config(SMALL, as_json=True)["config"]["max_batch_size"] == 8
    finally:
        server.stop()


def test_under_polling_a_changed_config_applies_without_a_request(configured: Path, tmp_path: Path) -> None:
    (configured / BROKEN / "config.json").unlink()
    server = start_server(configured, "--model-control-mode", "poll", "--repository-poll-s", "0.5",
                          log=tmp_path / "serve.log", cwd=REPO,
                          env={"OMP_NUM_THREADS": "2", "XDG_STATE_HOME": str(tmp_path / "state")}, timeout=120)
    try:
        client = triton.InferenceServerClient(server.url)
        assert client.get_model_config(WIDE, as_json=True)["config"]["max_batch_size"] == 16
        (configured / WIDE / "config.json").write_text(json.dumps({**WIDE_CONFIG, "max_batch_size": 24}))
        deadline = time.monotonic() + 60
        while client.get_model_config(WIDE, as_json=True)["config"]["max_batch_size"] != 24:
            assert time.monotonic() < deadline, "polling never applied the changed config.json"
            time.sleep(0.2)
        (configured / WIDE / "config.json").write_text('{"max_batch_size": "many"}')
        time.sleep(3)  # several polls: the refusal is reported, what serves keeps serving
        assert client.get_model_config(WIDE, as_json=True)["config"]["max_batch_size"] == 24
        assert client.is_model_ready(WIDE)
    finally:
        server.stop()
    assert "wide/config.json: max_batch_size: Input should be a valid integer" in (tmp_path / "serve.log").read_text()
