"""valley-serve driven by the unmodified tritonclient (sync and aio), as users call it."""

from __future__ import annotations

import asyncio
import queue
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from service.core.abstention import ABSTAIN
from service.core.inference import DEFAULT_OUTPUTS
from service.core.inference import SERVED_OUTPUTS as OUTPUTS
from service.core.sets import OUTPUTS as SET_OUTPUTS
from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, Reference, assert_matches, triton_inputs


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served.url)


def test_liveness_readiness_and_metadata(client: triton.InferenceServerClient, reference: Reference) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "7")
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "valley" and "model_repository" in server["extensions"]
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["versions"] == ["1"]
    shape = ["-1", *map(str, reference.input_shape)]
    assert model["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": shape}]
    assert [o["name"] for o in model["outputs"]] == [*OUTPUTS, ABSTAIN, *SET_OUTPUTS], \
        "an export with selective prediction and prediction sets"
    assert model["outputs"][-3] == {"name": ABSTAIN, "datatype": "BOOL", "shape": ["-1"]}
    assert model["outputs"][-2] == {"name": "prediction_set", "datatype": "BOOL", "shape": ["-1", "10"]}


@pytest.mark.parametrize("batch", [1, 2, 7, 32, 64])
def test_every_output_at_every_batch_size(client: triton.InferenceServerClient, reference: Reference,
                                          batch: int) -> None:
    pixels = reference.images(batch, seed=batch)
    outputs = [triton.InferRequestedOutput(name) for name in OUTPUTS]
    result = client.infer(MODEL, triton_inputs(pixels), outputs=outputs, request_id=f"batch-{batch}")
    assert result.get_response().id == f"batch-{batch}"
    assert result.get_response().model_version == "1"
    assert_matches(result, reference(pixels), list(OUTPUTS))


def test_without_requested_outputs_all_but_member_probabilities_come_back(client: triton.InferenceServerClient,
                                                                          reference: Reference) -> None:
    pixels = reference.images(3, seed=0)
    result = client.infer(MODEL, triton_inputs(pixels))
    assert [o.name for o in result.get_response().outputs] == [*DEFAULT_OUTPUTS, ABSTAIN, *SET_OUTPUTS]
    assert_matches(result, reference(pixels), list(DEFAULT_OUTPUTS))


def test_one_output_only(client: triton.InferenceServerClient, reference: Reference) -> None:
    pixels = reference.images(4, seed=1)
    result = client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput("mutual_information")])
    assert [o.name for o in result.get_response().outputs] == ["mutual_information"]
    assert_matches(result, reference(pixels), ["mutual_information"])


def test_a_concurrent_burst_matches_the_reference(served: ServerProcess, reference: Reference) -> None:
    """64 concurrent aio requests of 1..8 images: each answer equals in-process onnxruntime; batching merged them."""
    batches = [reference.images(1 + i % 8, seed=100 + i) for i in range(64)]

    async def burst() -> tuple[list[triton_aio.InferResult], dict[str, Any], dict[str, Any]]:
        async with triton_aio.InferenceServerClient(served.url) as client:
            before = await client.get_inference_statistics(MODEL, as_json=True)
            results = await asyncio.gather(*(
                client.infer(MODEL, triton_inputs(pixels), outputs=[triton.InferRequestedOutput("probabilities"),
                                                             triton.InferRequestedOutput("predicted_class")],
                             request_id=str(i)) for i, pixels in enumerate(batches)))
            after = await client.get_inference_statistics(MODEL, as_json=True)
            return list(results), before, after

    results, before, after = asyncio.run(burst())
    for i, (result, pixels) in enumerate(zip(results, batches, strict=True)):
        assert result.get_response().id == str(i)
        assert_matches(result, reference(pixels), ["probabilities", "predicted_class"])
    stats_before, stats_after = before["model_stats"][0], after["model_stats"][0]
    images = sum(len(pixels) for pixels in batches)
    assert int(stats_after["inference_count"]) - int(stats_before.get("inference_count", 0)) == images
    runs = int(stats_after["execution_count"]) - int(stats_before.get("execution_count", 0))
    assert runs < len(batches), "the dynamic batcher merged no requests"


def test_aio_client_metadata_and_errors(served: ServerProcess) -> None:
    async def check() -> None:
        async with triton_aio.InferenceServerClient(served.url) as client:
            assert await client.is_server_ready()
            assert (await client.get_model_metadata(MODEL, as_json=True))["name"] == MODEL
            with pytest.raises(InferenceServerException) as error:
                await client.get_model_metadata("missing")
            assert error.value.status() == "StatusCode.NOT_FOUND"

    asyncio.run(check())


def test_streaming_answers_each_request_and_survives_a_bad_one(served: ServerProcess,
                                                               reference: Reference) -> None:
    client = triton.InferenceServerClient(served.url)
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    batches = {f"s{i}": reference.images(1 + i % 3, seed=200 + i) for i in range(10)}
    try:
        for request_id, pixels in batches.items():
            client.async_stream_infer(MODEL, triton_inputs(pixels), request_id=request_id,
                                      outputs=[triton.InferRequestedOutput("probabilities")],
                                      enable_empty_final_response=True)
        client.async_stream_infer(MODEL, triton_inputs(reference.images(1, 0), name="wrong"), request_id="bad")
        received = [answers.get(timeout=30) for _ in range(len(batches) + 1)]
    finally:
        client.stop_stream()
    errors = [error for result, error in received if error is not None]
    assert len(errors) == 1 and "INVALID_ARGUMENT" in str(errors[0]) and "'pixels'" in str(errors[0])
    for result, error in received:
        if error is None:
            request_id = result.get_response().id
            assert_matches(result, reference(batches[request_id]), ["probabilities"])
            assert result.get_response().parameters["triton_final_response"].bool_param
    assert {result.get_response().id for result, error in received if error is None} == set(batches)


def test_statistics_count_images_runs_and_time(client: triton.InferenceServerClient, reference: Reference) -> None:
    before = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    client.infer(MODEL, triton_inputs(reference.images(5, seed=3)))
    after = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 5
    success_before = int(before["inference_stats"].get("success", {}).get("count", 0))
    assert int(after["inference_stats"]["success"]["count"]) == success_before + 1
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert any(int(b["batch_size"]) == 5 for b in after["batch_stats"])
    everything = client.get_inference_statistics(as_json=True)["model_stats"]
    assert [s["name"] for s in everything] == [MODEL]


def _shared(name: str) -> triton.InferRequestedOutput:
    output = triton.InferRequestedOutput(name)
    output.set_shared_memory("region", 40)
    return output


def _shared_input(pixels: np.ndarray) -> list[triton.InferInput]:
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_shared_memory("region", pixels.nbytes)
    return [tensor]


def _code(call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as error:
        call()
    return str(error.value.status()), str(error.value.message())


def test_errors_have_the_right_status_and_say_what_to_fix(client: triton.InferenceServerClient,
                                                          reference: Reference) -> None:
    pixels = reference.images(2, seed=4)
    cases = {
        "unknown model": (lambda: client.infer("nope", triton_inputs(pixels)), "NOT_FOUND", "unknown model 'nope'"),
        "unknown version": (lambda: client.infer(MODEL, triton_inputs(pixels), model_version="9"), "NOT_FOUND",
                            "no version '9'"),
        "input name": (lambda: client.infer(MODEL, triton_inputs(pixels, name="image")), "INVALID_ARGUMENT",
                       "exactly one input 'pixels'"),
        "datatype": (lambda: client.infer(MODEL, triton_inputs(pixels.astype(np.float32), datatype="FP32")),
                     "INVALID_ARGUMENT", "must be UINT8"),
        "shape": (lambda: client.infer(MODEL, triton_inputs(pixels[:, :, :8])), "INVALID_ARGUMENT", "must have shape"),
        "batch too large": (lambda: client.infer(MODEL, triton_inputs(reference.images(65, seed=5))),
                            "INVALID_ARGUMENT", "at most 64"),
        "unknown output": (lambda: client.infer(MODEL, triton_inputs(pixels),
                                                outputs=[triton.InferRequestedOutput("x")]),
                           "INVALID_ARGUMENT", "unknown output 'x'"),
        "classification of a non-class output": (lambda: client.infer(MODEL, triton_inputs(pixels), outputs=[
            triton.InferRequestedOutput("confidence", class_count=3)]), "INVALID_ARGUMENT",
            "classification (class_count) applies to 'probabilities'"),
        "config of unknown model": (lambda: client.get_model_config("nope"), "NOT_FOUND", "unknown model"),
        "shared-memory output": (lambda: client.infer(MODEL, triton_inputs(pixels), outputs=[_shared("probabilities")]),
                                 "INVALID_ARGUMENT", "shared-memory outputs"),
        "shared-memory input": (lambda: client.infer(MODEL, _shared_input(pixels)), "INVALID_ARGUMENT",
                                "shared-memory inputs are not supported"),
        "metadata of unknown model": (lambda: client.get_model_metadata("nope"), "NOT_FOUND", "unknown model"),
        "statistics of unknown model": (lambda: client.get_inference_statistics("nope"), "NOT_FOUND",
                                        "unknown model"),
        "load of unknown model": (lambda: client.load_model("nope"), "NOT_FOUND", "no ensemble 'nope'"),
    }
    for case, (call, status, words) in cases.items():
        code, message = _code(call)
        assert code == f"StatusCode.{status}", f"{case}: {code} {message}"
        assert words in message, f"{case}: {message!r}"
        assert "Traceback" not in message
    assert client.is_server_ready(), "bad requests must not hurt the server"
