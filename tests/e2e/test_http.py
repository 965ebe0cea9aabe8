"""valley-serve over HTTP/REST: the unmodified tritonclient.http (sync and aio) and plain HTTP requests.

Every answer is compared with the fused graph run in process and with what gRPC answers for the
same question; every refusal with its HTTP status and a message that says what to fix.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import shutil
import socket
import zlib
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException

from service._proto.valley.v1 import calibration_pb2 as calibration_pb
from service._proto.valley.v1 import calibration_pb2_grpc as calibration_grpc
from service.core.abstention import ABSTAIN
from service.core.inference import DEFAULT_OUTPUTS
from service.core.inference import SERVED_OUTPUTS as OUTPUTS
from service.core.sets import OUTPUTS as SET_OUTPUTS
from service.launch import ServerProcess
from service.transport import rest
from tests.e2e.conftest import (
    MODEL,
    Reference,
    ThreadServer,
    assert_matches,
    http_inputs,
    start_server_process,
    stop_server_process,
    thread_settings,
    triton_inputs,
)
from training.data import synthetic_images


@pytest.fixture(scope="module")
def client(served: ServerProcess) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(served.http_url)


def call(server: ServerProcess | ThreadServer, method: str, path: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (what curl sends): status, headers (lower-case names) and body."""
    port = server.http_port if isinstance(server, ServerProcess) else server.ports.http
    assert port is not None
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        connection.request(method, path, payload, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def infer_body(pixels: np.ndarray, **extra: Any) -> dict[str, Any]:
    """A JSON inference request as a curl user writes it: nested data."""
    return {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.tolist()}], **extra}


# -- health, metadata, configuration ----------------------------------------------------------


def test_health_and_metadata_say_what_grpc_says(client: triton.InferenceServerClient, served: ServerProcess) -> None:
    grpc = triton_grpc.InferenceServerClient(served.url)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("nope") and not client.is_model_ready(MODEL, "7")
    assert client.get_server_metadata() == grpc.get_server_metadata(as_json=True)
    for extension in ("classification", "model_configuration", "binary_tensor_data", "model_repository",
                      "statistics"):
        assert extension in client.get_server_metadata()["extensions"]
    metadata, theirs = client.get_model_metadata(MODEL), grpc.get_model_metadata(MODEL, as_json=True)
    assert metadata == client.get_model_metadata(MODEL, "1")
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (MODEL, ["1"], theirs["platform"])
    assert [o["name"] for o in metadata["outputs"]] == [*OUTPUTS, ABSTAIN, *SET_OUTPUTS]
    for ours, grpc_tensor in zip(metadata["inputs"] + metadata["outputs"], theirs["inputs"] + theirs["outputs"],
                                 strict=True):
        assert ours == {**grpc_tensor, "shape": [int(dim) for dim in grpc_tensor["shape"]]}
    # valley's own metadata parameters (tritonclient.grpc's message has no field for them).
    assert metadata["parameters"]["members_default"] == "full" and metadata["parameters"]["members_count"] == 3
    status, headers, body = call(served, "GET", "/v2/health/live")
    assert (status, json.loads(body), headers["content-type"]) == (200, {"live": True}, "application/json")
    assert call(served, "HEAD", "/v2/health/ready")[0] == 200
    status, _, body = call(served, "GET", "/v2/models/nope/ready")
    assert status == 404 and "unknown model 'nope'" in json.loads(body)["error"]
    status, _, body = call(served, "GET", f"/v2/models/{MODEL}/versions/9/ready")
    assert status == 404 and "no version '9'" in json.loads(body)["error"]


def test_the_model_configuration_is_triton_s_over_both_transports(client: triton.InferenceServerClient,
                                                                   served: ServerProcess,
                                                                   reference: Reference) -> None:
    """What perf_analyzer and model_analyzer read: Triton's ModelConfig, the same over HTTP and gRPC."""
    config = client.get_model_config(MODEL)
    assert config == client.get_model_config(MODEL, "1")
    # Triton's own message (tritonclient's copy of model_config.proto) takes the JSON field by field.
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())
    assert parsed == triton_grpc.InferenceServerClient(served.url).get_model_config(MODEL).config
    assert (config["name"], config["platform"], config["max_batch_size"]) == (MODEL, "valley_ensemble", 64)
    assert config["input"] == [{"name": "pixels", "data_type": "TYPE_UINT8", "format": "FORMAT_NCHW",
                                "dims": list(reference.input_shape)}]
    outputs = {output["name"]: output for output in config["output"]}
    assert list(outputs) == [*OUTPUTS, ABSTAIN, *SET_OUTPUTS]
    assert outputs["probabilities"] == {"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}
    assert outputs["member_probabilities"]["dims"] == [reference.members, 10]
    assert outputs["predicted_class"] == {"name": "predicted_class", "data_type": "TYPE_INT64", "dims": [1],
                                          "reshape": {"shape": []}}
    assert outputs[ABSTAIN]["data_type"] == "TYPE_BOOL"
    assert outputs["prediction_set"] == {"name": "prediction_set", "data_type": "TYPE_BOOL", "dims": [10]}
    assert outputs["set_size"]["data_type"] == "TYPE_INT64" and outputs["set_size"]["dims"] == [1]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 5000, "the fixture's --max-queue-delay-ms 5"
    assert batching["default_queue_policy"]["max_queue_size"] == 1024
    assert config["instance_group"] == [{"name": f"{MODEL}_0", "kind": "KIND_CPU", "count": 2}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert json.loads(config["parameters"]["classes"]["string_value"]) == [f"class-{i}" for i in range(10)]
    assert config["parameters"]["members_default"]["string_value"] == "full"
    with pytest.raises(InferenceServerException) as refused:
        client.get_model_config("nope")
    assert refused.value.status() == "404" and "unknown model 'nope'" in str(refused.value.message())


# -- inference --------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_every_output_in_binary_and_json(client: triton.InferenceServerClient, reference: Reference,
                                         binary: bool) -> None:
    pixels = reference.images(5, seed=21)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    result = client.infer(MODEL, http_inputs(pixels, binary), outputs=outputs, request_id="r-5",
                          parameters={"members": "full"})
    response = result.get_response()
    assert (response["id"], response["model_name"], response["model_version"]) == ("r-5", MODEL, "1")
    assert response["parameters"]["members"] == "full"
    assert all(("data" in output) != binary for output in response["outputs"])
    assert_matches(result, reference(pixels), list(OUTPUTS))


def test_without_requested_outputs_the_defaults_come_back_binary(client: triton.InferenceServerClient,
                                                                  reference: Reference) -> None:
    pixels = reference.images(3, seed=22)
    result = client.infer(MODEL, http_inputs(pixels))  # tritonclient asks binary_data_output: true
    assert [o["name"] for o in result.get_response()["outputs"]] == [*DEFAULT_OUTPUTS, ABSTAIN, *SET_OUTPUTS]
    assert_matches(result, reference(pixels), list(DEFAULT_OUTPUTS))


def test_curl_style_json_with_nested_data(served: ServerProcess, reference: Reference) -> None:
    pixels = reference.images(2, seed=23)
    status, headers, body = call(served, "POST", f"/v2/models/{MODEL}/infer",
                                 infer_body(pixels, id="curl", outputs=[{"name": "probabilities"},
                                                                        {"name": "predicted_class"}]))
    assert status == 200 and headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert answer["id"] == "curl" and [o["name"] for o in answer["outputs"]] == ["probabilities", "predicted_class"]
    expected = reference(pixels)
    probabilities = answer["outputs"][0]
    assert (probabilities["datatype"], probabilities["shape"]) == ("FP32", [2, 10])
    np.testing.assert_allclose(np.reshape(probabilities["data"], (2, 10)), expected["probabilities"], atol=1e-6)
    assert answer["outputs"][1]["data"] == expected["predicted_class"].tolist()


def test_binary_data_sent_by_hand_and_compressed_bodies(served: ServerProcess, reference: Reference) -> None:
    """The binary-data extension as written by hand, a gzip request body, and an answer compressed when accepted."""
    pixels = reference.images(4, seed=24)
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                     "parameters": {"binary_data_size": pixels.nbytes}}],
                         "outputs": [{"name": "confidence", "parameters": {"binary_data": True}}]}).encode()
    body = header + pixels.tobytes()
    expected = reference(pixels)["confidence"]
    for encoding, payload in (("identity", body), ("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        status, headers, answer = call(served, "POST", f"/v2/models/{MODEL}/versions/1/infer", payload,
                                       {"Inference-Header-Content-Length": str(len(header)),
                                        "Content-Encoding": encoding, "Content-Type": "application/octet-stream"})
        assert status == 200 and headers["content-type"] == "application/octet-stream", answer
        length = int(headers["inference-header-content-length"])
        described = json.loads(answer[:length])["outputs"][0]
        assert described["parameters"]["binary_data_size"] == expected.nbytes
        np.testing.assert_allclose(np.frombuffer(answer[length:], np.float32), expected, atol=1e-6)
    many = reference.images(32, seed=25)
    status, headers, answer = call(served, "POST", f"/v2/models/{MODEL}/infer", infer_body(many),
                                   {"Accept-Encoding": "gzip"})
    assert status == 200 and headers["content-encoding"] == "gzip"
    assert len(json.loads(gzip.decompress(answer))["outputs"]) == len(DEFAULT_OUTPUTS) + 1 + len(SET_OUTPUTS)


def test_the_async_client(served: ServerProcess, reference: Reference) -> None:
    pixels = reference.images(6, seed=26)

    async def session() -> tuple[bool, dict[str, Any], list[triton_aio.InferResult], dict[str, Any]]:
        async with triton_aio.InferenceServerClient(served.http_url) as client:
            ready = await client.is_server_ready() and await client.is_model_ready(MODEL)
            config = await client.get_model_config(MODEL)
            results = [await client.infer(MODEL, http_inputs(pixels, binary),
                                          outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in OUTPUTS])
                       for binary in (True, False)]
            burst = await asyncio.gather(*(client.infer(MODEL, http_inputs(reference.images(1 + i % 4, seed=i)))
                                           for i in range(24)))
            assert all(r.as_numpy("probabilities").shape == (1 + i % 4, 10) for i, r in enumerate(burst))
            return ready, config, results, await client.get_inference_statistics(MODEL)

    ready, config, results, statistics = asyncio.run(session())
    assert ready and config["max_batch_size"] == 64
    for result in results:
        assert_matches(result, reference(pixels), list(OUTPUTS))
    assert statistics["model_stats"][0]["inference_count"] >= 6 + 6 + sum(1 + i % 4 for i in range(24))


def test_statistics_match_grpc_s(client: triton.InferenceServerClient, served: ServerProcess,
                                 reference: Reference) -> None:
    before = client.get_inference_statistics(MODEL)["model_stats"][0]["inference_count"]
    client.infer(MODEL, http_inputs(reference.images(7, seed=27)))
    stats = client.get_inference_statistics(MODEL, "1")["model_stats"]
    assert stats == client.get_inference_statistics()["model_stats"]
    assert stats[0]["inference_count"] == before + 7
    assert stats[0]["inference_stats"]["success"]["count"] >= 1 and stats[0]["batch_stats"]
    grpc = triton_grpc.InferenceServerClient(served.url).get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
    assert int(grpc["inference_count"]) == stats[0]["inference_count"]
    assert set(grpc["inference_stats"]) <= set(stats[0]["inference_stats"])


# -- classification -----------------------------------------------------------------------


def _parsed(strings: np.ndarray) -> list[list[tuple[float, int, str]]]:
    rows = []
    for row in strings:
        parts = [(item.decode() if isinstance(item, bytes) else item).split(":", 2) for item in row]
        rows.append([(float(score), int(index), label) for score, index, label in parts])
    return rows


def test_class_count_gives_the_right_labels_in_order_on_real_images(fashion_repository: Path) -> None:
    """Fashion-MNIST test images: the top classes by name, over HTTP (binary and JSON) and gRPC alike."""
    from training.data import FASHION_MNIST_DIR, read_idx

    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:40, None]
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")[:40]
    classes = json.loads((fashion_repository / "fashion" / "1" / "manifest.json").read_text())["classes"]
    assert classes[9] == "Ankle boot"
    server = start_server_process(fashion_repository)
    try:
        http_client = triton.InferenceServerClient(server.http_url)
        grpc_client = triton_grpc.InferenceServerClient(server.url)
        tensor = triton_grpc.InferInput("pixels", list(images.shape), "UINT8")
        tensor.set_data_from_numpy(images)
        probabilities = grpc_client.infer("fashion", [tensor], outputs=[
            triton_grpc.InferRequestedOutput("probabilities")]).as_numpy("probabilities")
        assert probabilities is not None and (probabilities.argmax(1) == labels).mean() > 0.6, "a trained ensemble"
        order = np.argsort(-probabilities, axis=1, kind="stable")
        answers = {
            "http binary": http_client.infer("fashion", http_inputs(images), outputs=[
                triton.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities"),
            "http json": http_client.infer("fashion", http_inputs(images, binary=False), outputs=[
                triton.InferRequestedOutput("probabilities", binary_data=False, class_count=3)]
                ).as_numpy("probabilities"),
            "grpc": grpc_client.infer("fashion", [tensor], outputs=[
                triton_grpc.InferRequestedOutput("probabilities", class_count=3)]).as_numpy("probabilities"),
        }
        for transport, strings in answers.items():
            assert strings is not None and strings.shape == (40, 3), transport
            for row, top in enumerate(_parsed(strings)):
                assert [index for _, index, _ in top] == order[row, :3].tolist(), transport
                assert [label for _, _, label in top] == [classes[i] for i in order[row, :3]], transport
                np.testing.assert_allclose([score for score, _, _ in top], probabilities[row, order[row, :3]],
                                           atol=1e-6)
        everything = http_client.infer("fashion", http_inputs(images[:2]), outputs=[
            triton.InferRequestedOutput("probabilities", class_count=25)]).as_numpy("probabilities")
        assert everything is not None and everything.shape == (2, 10), "more classes than there are: all of them"
        plain = http_client.infer("fashion", http_inputs(images[:2]), outputs=[
            triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("confidence")],
            parameters={})
        assert plain.as_numpy("probabilities").dtype == np.float32
        status, _, body = call(server, "POST", "/v2/models/fashion/infer", infer_body(
            images[:1], outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]))
        assert status == 200 and json.loads(body)["outputs"][0]["datatype"] == "FP32", "0 asks for no classification"
    finally:
        stop_server_process(server)


# -- refusals -------------------------------------------------------------------------------


def test_errors_have_their_http_status_and_say_what_to_fix(served: ServerProcess, reference: Reference) -> None:
    pixels = reference.images(2, seed=28)
    good = infer_body(pixels)
    tensor = good["inputs"][0]
    infer = f"/v2/models/{MODEL}/infer"
    binary_header = json.dumps({"inputs": [{**tensor, "data": None, "parameters": {"binary_data_size": 9}}]}).encode()
    cases: dict[str, tuple[str, str, bytes | dict[str, Any] | None, dict[str, str], int, str]] = {
        "not json": ("POST", infer, b"{nope", {}, 400, "not valid JSON"),
        "json not an object": ("POST", infer, b"[1, 2]", {}, 400, "must be a JSON object"),
        "no inputs": ("POST", infer, {"outputs": []}, {}, 400, "needs 'inputs'"),
        "unknown model": ("POST", "/v2/models/nope/infer", good, {}, 404, "unknown model 'nope'"),
        "unknown version": ("POST", f"/v2/models/{MODEL}/versions/9/infer", good, {}, 404, "no version '9'"),
        "input name": ("POST", infer, {"inputs": [{**tensor, "name": "image"}]}, {}, 400,
                       "exactly one input 'pixels'"),
        "datatype": ("POST", infer, {"inputs": [{**tensor, "datatype": "FP32"}]}, {}, 400, "must be UINT8"),
        "unknown datatype": ("POST", infer, {"inputs": [{**tensor, "datatype": "COMPLEX"}]}, {}, 400,
                             "not supported"),
        "shape": ("POST", infer, {"inputs": [{**tensor, "shape": [2, 1, 16, 8]}]}, {}, 400, "must have shape"),
        "negative shape": ("POST", infer, {"inputs": [{**tensor, "shape": [2, -1, 16, 16]}]}, {}, 400,
                           "negative dimension"),
        "shape of text": ("POST", infer, {"inputs": [{**tensor, "shape": ["2", 1, 16, 16]}]}, {}, 400,
                          "shape must be a list of integers"),
        "too few values": ("POST", infer, {"inputs": [{**tensor, "data": [1, 2, 3]}]}, {}, 400, "3 values in data"),
        "ragged data": ("POST", infer, {"inputs": [{**tensor, "data": [[1, 2], [3]]}]}, {}, 400, "must nest"),
        "text data": ("POST", infer, {"inputs": [{**tensor, "data": ["a"] * pixels.size}]}, {}, 400,
                      "must be integers"),
        "fractions for UINT8": ("POST", infer, {"inputs": [{**tensor, "data": [0.5] * pixels.size}]}, {}, 400,
                                "must be integers"),
        "out of range": ("POST", infer, {"inputs": [{**tensor, "data": [300] * pixels.size}]}, {}, 400,
                         "outside the UINT8 range"),
        "batch too large": ("POST", infer, infer_body(reference.images(65, seed=5)), {}, 400, "at most 64"),
        "unknown output": ("POST", infer, {**good, "outputs": [{"name": "x"}]}, {}, 400, "unknown output 'x'"),
        "twice the same output": ("POST", infer, {**good, "outputs": [{"name": "entropy"}, {"name": "entropy"}]}, {},
                                  400, "asked for twice"),
        "class_count of a non-class output": (
            "POST", infer, {**good, "outputs": [{"name": "confidence", "parameters": {"classification": 2}}]}, {},
            400, "classification (class_count) applies to 'probabilities'"),
        "negative class_count": (
            "POST", infer, {**good, "outputs": [{"name": "probabilities", "parameters": {"classification": -1}}]},
            {}, 400, "positive number of classes"),
        "text class_count": (
            "POST", infer, {**good, "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}]},
            {}, 400, "must be an integer"),
        "shared-memory output": (
            "POST", infer, {**good, "outputs": [{"name": "probabilities",
                                                  "parameters": {"shared_memory_region": "r"}}]}, {}, 400,
            "shared-memory outputs"),
        "members": ("POST", infer, {**good, "parameters": {"members": 99}}, {}, 400, "asks for 99 members"),
        "target accuracy": ("POST", infer, {**good, "parameters": {"target_accuracy": 2}}, {}, 400,
                            "target_accuracy"),
        "binary_data_output": ("POST", infer, {**good, "parameters": {"binary_data_output": "yes"}}, {}, 400,
                               "must be true or false"),
        "id not text": ("POST", infer, {**good, "id": 5}, {}, 400, "id must be a string"),
        "parameters not an object": ("POST", infer, {**good, "parameters": [1]}, {}, 400, "must be a JSON object"),
        "binary size": ("POST", infer, binary_header + bytes(9), {"Inference-Header-Content-Length":
                                                                  str(len(binary_header))}, 400,
                        "9 bytes of binary data (binary_data_size), but UINT8"),
        "header length past the body": ("POST", infer, json.dumps(good).encode(),
                                        {"Inference-Header-Content-Length": "999999"}, 400, "Inference-Header"),
        "bytes no input claims": ("POST", infer, json.dumps(good).encode() + b"xyz",
                                  {"Inference-Header-Content-Length": str(len(json.dumps(good)))}, 400,
                                  "3 bytes of binary data"),
        "unknown encoding": ("POST", infer, json.dumps(good).encode(), {"Content-Encoding": "br"}, 400,
                             "Content-Encoding 'br'"),
        "broken gzip": ("POST", infer, b"not gzip", {"Content-Encoding": "gzip"}, 400, "does not decompress"),
        "unknown route": ("GET", "/v3/whatever", None, {}, 404, "no endpoint GET /v3/whatever"),
        "wrong method": ("GET", infer, None, {}, 405, "GET is not allowed"),
        "config of unknown model": ("GET", "/v2/models/nope/config", None, {}, 404, "unknown model"),
        "statistics of unknown model": ("GET", "/v2/models/nope/stats", None, {}, 404, "unknown model"),
        "load of unknown model": ("POST", "/v2/repository/models/nope/load", None, {}, 404, "no ensemble 'nope'"),
        "load parameters": ("POST", f"/v2/repository/models/{MODEL}/load", {"parameters": {"file:x": "eA=="}}, {},
                            400, "not supported"),
        "load config not text": ("POST", f"/v2/repository/models/{MODEL}/load", {"parameters": {"config": 3}}, {},
                                 400, "must be a string"),
        "overlong name": ("GET", f"/v2/models/{'m' * 300}", None, {}, 400, "at most 256"),
        "feedback without labels": ("POST", "/valley/v1/feedback", {"labels": 3}, {}, 400, "needs 'labels'"),
        "feedback for nothing served": ("POST", "/valley/v1/feedback", {"labels": [
            {"model_name": MODEL, "request_id": "never", "position": 0, "true_class": 1}]}, {}, 404, "never"),
    }
    for case, (method, path, body, headers, expected, words) in cases.items():
        status, answer_headers, answer = call(served, method, path, body, headers)
        assert status == expected, f"{case}: {status} {answer[:300]!r}"
        assert answer_headers["content-type"] == "application/json", case
        message = json.loads(answer)["error"]
        assert words in message, f"{case}: {message!r}"
        assert "Traceback" not in message and len(message) <= 400, case
    assert triton.InferenceServerClient(served.http_url).is_server_ready(), "bad requests must not hurt the server"


def test_tritonclient_http_raises_with_the_status_and_message(client: triton.InferenceServerClient,
                                                              reference: Reference) -> None:
    pixels = reference.images(2, seed=29)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, http_inputs(pixels.astype(np.float32), datatype="FP32"))
    assert refused.value.status() == "400" and "must be UINT8" in str(refused.value.message())
    with pytest.raises(InferenceServerException) as refused:
        client.infer("nope", http_inputs(pixels))
    assert refused.value.status() == "404"


def test_bodies_past_the_size_limit_are_refused_before_and_after_decompression(repository: Path,
                                                                               reference: Reference) -> None:
    with ThreadServer(thread_settings(repository, max_message_bytes=64 << 10)) as server:
        pixels = reference.images(2, seed=30)
        status, _, body = call(server, "POST", f"/v2/models/{MODEL}/infer", b"x" * (65 << 10))
        assert status == 413 and "at most 65536" in json.loads(body)["error"]
        bomb = gzip.compress(json.dumps(infer_body(pixels)).encode() + b" " * (8 << 20))
        assert len(bomb) < 64 << 10
        status, _, body = call(server, "POST", f"/v2/models/{MODEL}/infer", bomb, {"Content-Encoding": "gzip"})
        assert status == 413 and "decompresses to more than 65536" in json.loads(body)["error"]
        status, _, body = call(server, "POST", f"/v2/models/{MODEL}/infer", infer_body(pixels))
        assert status == 200, body


# -- repository and feedback ----------------------------------------------------------------


def test_the_repository_extension(versioned: tuple[Path, ServerProcess]) -> None:
    _, server = versioned
    client = triton.InferenceServerClient(server.http_url)
    assert client.get_model_repository_index() == [{"name": MODEL, "version": "1", "state": "READY", "reason": ""}]
    status, _, body = call(server, "POST", "/v2/repository/index", {"ready": True})
    assert status == 200 and [entry["name"] for entry in json.loads(body)] == [MODEL]
    client.unload_model(MODEL)
    assert not client.is_model_ready(MODEL)
    status, _, body = call(server, "GET", f"/v2/models/{MODEL}/ready")
    assert status in (404, 503) and MODEL in json.loads(body)["error"]
    client.load_model(MODEL, config=json.dumps({"version_policy": {"all": {}}}))
    assert client.is_model_ready(MODEL) and client.get_model_config(MODEL)["version_policy"] == {"all": {}}
    # A configuration sent back as it was read loads (model_analyzer's way), from either transport's JSON; one that
    # asks for other settings is refused, naming them.
    config = client.get_model_config(MODEL)
    client.load_model(MODEL, config=json.dumps({**config, "version_policy": {"latest": {"num_versions": 1}}}))
    assert client.get_model_config(MODEL)["version_policy"] == {"latest": {"num_versions": 1}}
    grpc_client = triton_grpc.InferenceServerClient(server.url)
    grpc_client.load_model(MODEL, config=json.dumps(grpc_client.get_model_config(MODEL, as_json=True)["config"]))
    with pytest.raises(InferenceServerException) as refused:
        client.load_model(MODEL, config=json.dumps({**config, "max_batch_size": 8, "optimization": {"priority": 1}}))
    assert refused.value.status() == "400"
    assert "other max_batch_size, optimization than it serves with" in str(refused.value.message())
    assert client.is_model_ready(MODEL), "a refused load changes nothing"


def test_labels_come_back_over_http_and_requests_are_counted(repository: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository)) as server:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.ports.http}")
        client.infer(MODEL, http_inputs(reference.images(2, seed=31)), request_id="labelled")
        labels = {"labels": [{"model_name": MODEL, "request_id": "labelled", "position": p, "true_class": 3}
                             for p in (0, 1)]}
        status, _, body = call(server, "POST", "/valley/v1/feedback", labels)
        assert (status, json.loads(body)) == (200, {"accepted": 2})
        status, _, body = call(server, "POST", "/valley/v1/feedback", labels)
        assert status == 409 and "already" in json.loads(body)["error"]
        registry = server.server.registry
        assert registry.get_sample_value("valley_requests_total", {"model": MODEL, "version": "1", "code": "OK"}) == 1
        assert registry.get_sample_value("valley_live_window_predictions", {"model": MODEL, "version": "1"}) == 2


def test_calibration_over_http_suggests_and_publishes(exported: Path, tmp_path: Path) -> None:
    """Labels for a shifted stream reported over HTTP; the suggestion over HTTP equals gRPC's; recalibrate publishes
    version 2, which then serves."""
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    server = start_server_process(repository, "--recalibration-min-labels", "100", "--calibration-window", "400")
    try:
        client = triton.InferenceServerClient(server.http_url)
        split = synthetic_images(200, seed=41)
        noisy = split.images.numpy() + np.random.default_rng(41).normal(0, 70, split.images.shape)
        pixels, labels = np.clip(noisy, 0, 255).astype(np.uint8), split.labels.numpy()
        status, _, body = call(server, "GET", f"/valley/v1/models/{MODEL}/calibration")
        assert status == 400 and "labelled predictions" in json.loads(body)["error"], "FAILED_PRECONDITION: 400"
        for start in range(0, 200, 50):
            client.infer(MODEL, http_inputs(pixels[start:start + 50]), request_id=f"shift-{start}")
            status, _, body = call(server, "POST", "/valley/v1/feedback", {"labels": [
                {"model_name": MODEL, "request_id": f"shift-{start}", "position": row,
                 "true_class": int(labels[start + row])} for row in range(50)]})
            assert (status, json.loads(body)) == (200, {"accepted": 50})
        status, _, body = call(server, "GET", f"/valley/v1/models/{MODEL}/calibration")
        suggestion = json.loads(body)
        assert status == 200 and suggestion["labels"] == 200 and suggestion["model_version"] == "1"
        with grpc.insecure_channel(server.url) as channel:
            stub = calibration_grpc.CalibrationStub(channel)  # type: ignore[no-untyped-call]
            theirs = stub.Suggest(calibration_pb.SuggestRequest(model_name=MODEL), timeout=30)
        assert suggestion["suggested_temperature"] == pytest.approx(theirs.suggested_temperature)
        assert suggestion["current"]["ece"] == pytest.approx(theirs.current.ece)
        status, _, body = call(server, "POST", f"/valley/v1/models/{MODEL}/recalibrate", {"temperature": "hot"})
        assert status == 400 and "must be a number" in json.loads(body)["error"]
        status, _, body = call(server, "POST", f"/valley/v1/models/{MODEL}/recalibrate", {})
        published = json.loads(body)
        assert status == 200 and published["published_version"] == "2", body
        assert published["temperature"] == pytest.approx(suggestion["suggested_temperature"], rel=1e-3)
        assert client.get_model_metadata(MODEL)["versions"] == ["2"]
        assert client.infer(MODEL, http_inputs(pixels[:2])).get_response()["model_version"] == "2"
    finally:
        stop_server_process(server)


def test_a_body_that_trickles_is_refused_408_and_frees_its_place(repository: Path, reference: Reference,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rest, "BODY_TIMEOUT_S", 0.5)
    with ThreadServer(thread_settings(repository, max_concurrent_rpcs=1)) as server:
        assert server.ports.http is not None
        with socket.create_connection(("127.0.0.1", server.ports.http), timeout=10) as slow:
            slow.sendall(f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{"
                         .encode())
            response = http.client.HTTPResponse(slow)
            response.begin()
            status, text = response.status, response.read()
        assert status == 408 and "did not arrive within" in json.loads(text)["error"], text
        status, _, body = call(server, "POST", f"/v2/models/{MODEL}/infer", infer_body(reference.images(1, seed=3)))
        assert status == 200, body


def test_http_false_serves_grpc_only(repository: Path, reference: Reference) -> None:
    server = start_server_process(repository, "--http", "false")
    try:
        assert server.http_port is None
        with pytest.raises(ValueError, match="--http false"):
            _ = server.http_url
        pixels = reference.images(1, seed=5)
        assert triton_grpc.InferenceServerClient(server.url).infer(MODEL, triton_inputs(pixels)).as_numpy(
            "probabilities") is not None
    finally:
        stop_server_process(server)
