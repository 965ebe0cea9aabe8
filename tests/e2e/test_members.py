"""Which members answer: the default cascade, a request's `members` parameter, and overload's cut, end to end.

The server is `valley-serve` as a user starts it, talked to with tritonclient. Its answers are
compared with the member graphs run in this process and combined by `artefact.cascade`, the
code training measures the cascade with, not with the server's own staging.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from artefact.cascade import Cascade, run_cascade
from artefact.uncertainty import softmax
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service.launch import ServerProcess, start_server
from tests.conftest import REPO
from tests.e2e.conftest import MODEL, Reference, stop_server_process, triton_inputs

OUTPUTS = ["probabilities", "members_used", "member_probabilities"]


class Members:
    """Each member graph run in this process, tempered as the manifest says: [N, K, C] probabilities."""

    def __init__(self, version_dir: Path) -> None:
        manifest = json.loads((version_dir / "manifest.json").read_text())
        self.temperature = manifest["temperature"]
        self.sessions = [onnxruntime.InferenceSession(str(version_dir / m["file"]), providers=["CPUExecutionProvider"])
                         for m in manifest["members"]]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        logits = [session.run(None, {"pixels": pixels})[0] for session in self.sessions]
        return np.stack([softmax(x / np.float32(self.temperature)) for x in logits], axis=1)


@pytest.fixture(scope="module")
def cascaded(exported: Path, reference: Reference, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic ensemble with a cascade that lets about half of the test images leave after the first member
    (its threshold is the median first-member confidence of those images)."""
    root = tmp_path_factory.mktemp("cascaded")
    version = root / MODEL / "1"
    shutil.copytree(exported, version)
    confidence = Members(version)(_pixels(reference))[:, 0].max(axis=-1)
    manifest = json.loads((version / "manifest.json").read_text())
    members = len(manifest["members"])
    quality = {"accuracy": 0.9, "nll": 0.3, "ece": 0.01, "members_per_image": 1.5}
    manifest["cascade"] = {"stages": [1, members], "thresholds": [float(np.median(confidence))],
                           "max_nll_increase": 0.01, "max_accuracy_drop": 0.001, "validation": quality,
                           "validation_full": quality, "test": quality, "test_full": quality}
    (version / "manifest.json").write_text(json.dumps(manifest))
    return version


def _pixels(reference: Reference, count: int = 32) -> np.ndarray:
    return reference.images(count, seed=21)


def _start(repository: Path, *flags: str) -> ServerProcess:
    log = repository.parent / "valley-serve.log"
    return start_server(repository, "--max-queue-delay-ms", "5", *flags, log=log, cwd=REPO,
                        env={"OMP_NUM_THREADS": "2"}, timeout=60)


@pytest.fixture(scope="module")
def server(cascaded: Path) -> Iterator[ServerProcess]:
    """valley-serve with no --members flag: the default."""
    process = _start(cascaded.parent.parent)
    yield process
    stop_server_process(process)


def infer(url: str, pixels: np.ndarray, outputs: Sequence[str] = OUTPUTS, **parameters: object
          ) -> triton.InferResult:
    """`outputs` of the synthetic model for `pixels`, with the request `parameters`, through tritonclient."""
    client = triton.InferenceServerClient(url)
    return client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput(n) for n in outputs],
                        parameters=parameters or None)


def _parameters(result: triton.InferResult) -> dict[str, object]:
    parameters = result.get_response().parameters
    return {key: getattr(value, value.WhichOneof("parameter_choice")) for key, value in parameters.items()}


def test_by_default_the_fitted_cascade_answers(server: ServerProcess, cascaded: Path, reference: Reference) -> None:
    pixels = _pixels(reference)
    members = Members(cascaded)(pixels)
    manifest = json.loads((cascaded / "manifest.json").read_text())
    cascade = Cascade(tuple(manifest["cascade"]["stages"]), tuple(manifest["cascade"]["thresholds"]))
    expected, used = run_cascade(members, cascade)
    assert 0 < np.sum(used == 1) < len(used), "the test images split between the two stages"

    result = infer(server.url, pixels)
    np.testing.assert_array_equal(result.as_numpy("members_used"), used)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)
    served = result.as_numpy("member_probabilities")
    early = used == 1
    np.testing.assert_allclose(served[~early], members[~early], atol=1e-5)
    np.testing.assert_allclose(served[early, 0], members[early, 0], atol=1e-5)
    assert not served[early, 1:].any(), "members an image did not go through are zero"
    assert _parameters(result) == {"members": "cascade"}


def test_model_metadata_reports_the_default(server: ServerProcess, cascaded: Path) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), timeout=10)
    parameters = {key: getattr(value, value.WhichOneof("parameter_choice"))
                  for key, value in metadata.parameters.items()}
    members = len(json.loads((cascaded / "manifest.json").read_text())["members"])
    assert parameters["members_default"] == "cascade" and parameters["members_count"] == members
    assert parameters["cascade_stages"] == f"1,{members}" and parameters["degrade_to_members"] == 1
    assert "members_used" in [output.name for output in metadata.outputs]


def test_a_request_names_its_members(server: ServerProcess, cascaded: Path, reference: Reference) -> None:
    pixels = _pixels(reference, 9)
    members = Members(cascaded)(pixels)
    count = members.shape[1]
    for asked in (2, "2", np.int64(2).item()):
        result = infer(server.url, pixels, members=asked)
        assert result.as_numpy("members_used").tolist() == [2] * 9
        np.testing.assert_allclose(result.as_numpy("probabilities"), members[:, :2].mean(axis=1), atol=1e-5)
        assert _parameters(result) == {"members": "2"}
    full = infer(server.url, pixels, members="full")
    assert full.as_numpy("members_used").tolist() == [count] * 9
    np.testing.assert_allclose(full.as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)
    assert _parameters(infer(server.url, pixels, members="cascade")) == {"members": "cascade"}


@pytest.mark.parametrize("value", [0, -1, 99, "most", "", True, 2.5, "1e3"])
def test_a_bad_members_parameter_is_invalid_argument(server: ServerProcess, reference: Reference,
                                                     value: object) -> None:
    with pytest.raises(InferenceServerException) as caught:
        infer(server.url, _pixels(reference, 1), members=value)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'members'" in str(caught.value.message())
    assert infer(server.url, _pixels(reference, 1)).as_numpy("probabilities").shape[0] == 1


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_overload_cuts_the_default_plan_to_its_first_stage(cascaded: Path, reference: Reference) -> None:
    """One image per run and a 1 ms bound: a burst queues past it, and the default plan is cut (and says so);
    requests that named their members are not; once the queue drains, the default plan answers again."""
    process = _start(cascaded.parent.parent, "--max-batch-size", "1", "--instances", "1", "--degrade-queue-ms", "1")
    try:
        pixels = _pixels(reference, 1)
        count = len(json.loads((cascaded / "manifest.json").read_text())["members"])
        burst = [{} if index % 4 else {"members": "full"} for index in range(48)]
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda asked: (asked, infer(process.url, pixels, **asked)), burst))
        degraded = [result for asked, result in results if _parameters(result).get("degraded")]
        assert degraded, "a burst on one-image runs queued past 1 ms"
        for result in degraded:
            assert result.as_numpy("members_used").tolist() == [1] and _parameters(result)["members"] == "1"
        for asked, result in results:
            if asked:
                assert result.as_numpy("members_used").tolist() == [count] and "degraded" not in _parameters(result)
        assert _metric(process.metrics_port, "valley_degraded_requests_total") == len(degraded)
        quiet = infer(process.url, pixels)
        assert _parameters(quiet) == {"members": "cascade"}, "a lone request after the burst is not cut"
    finally:
        stop_server_process(process)
