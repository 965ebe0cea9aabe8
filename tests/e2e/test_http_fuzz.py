"""Malformed requests to the HTTP port of a running `valley-serve`: mutated valid requests, random JSON, raw bytes.

Every answer must be one a client can act on: a 4xx or 503 with `{"error": message}` (never a 500, never
a message over 400 characters or one that shows where the repository lies, never silence past 10 s),
or a 200 for a request that happens to be valid. Once the campaign is over the server must serve the
same probabilities as before it.
"""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.launch import ServerProcess
from tests.e2e.conftest import MODEL, Reference, start_server_process, stop_server_process

ACTIONABLE = {200, 400, 401, 403, 404, 405, 409, 413, 503}
PATHS = ["/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/config",
         f"/v2/models/{MODEL}/stats", "/v2/models/stats", f"/v2/models/{MODEL}/infer",
         f"/v2/models/{MODEL}/versions/1/infer", "/v2/repository/index", "/valley/v1/feedback",
         f"/valley/v1/models/{MODEL}/calibration", "/v2/health/ready", "/v2/models/%00/infer", "/v2/models//infer",
         f"/v2/models/{MODEL}/versions/-1/infer", f"/v2/models/{MODEL}/versions/99999999999999999999/config"]


@pytest.fixture(scope="module")
def fuzzed(repository: Any) -> Iterator[ServerProcess]:
    # The repository stays as it is: load and unload are left out (test_http.py covers them).
    server = start_server_process(repository, "--max-message-bytes", str(1 << 20))
    yield server
    stop_server_process(server)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=40)
FIELDS = ["id", "inputs", "outputs", "parameters", "name", "datatype", "shape", "data", "binary_data_size",
          "classification", "binary_data", "binary_data_output", "members", "target_accuracy", "timeout"]


def _valid(pixels: np.ndarray) -> dict[str, Any]:
    return {"id": "f", "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": list(pixels.shape),
                                   "data": pixels.ravel().tolist()}],
            "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}, {"name": "confidence"}]}


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """`base` with one to three fields, anywhere in it, replaced by random JSON."""
    request: dict[str, Any] = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        holder = draw(st.sampled_from(_objects(request)))
        holder[draw(st.sampled_from(FIELDS))] = draw(json_values)
    return request


def _objects(node: Any) -> list[dict[str, Any]]:
    """Every JSON object in `node` (of lists, their first four items)."""
    if isinstance(node, dict):
        return [node, *(found for value in node.values() for found in _objects(value))]
    if isinstance(node, list):
        return [found for value in node[:4] for found in _objects(value)]
    return []


def _send(server: ServerProcess, method: str, path: str, body: bytes | None,
          headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    assert server.http_port is not None
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        connection.request(method, path, body, headers)
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


def _judge(server: ServerProcess, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> None:
    status, answer_headers, answer = _send(server, method, path, body, headers)
    assert status in ACTIONABLE, f"{method} {path} {headers} {body!r:.300}: {status} {answer!r:.300}"
    if status != 200:
        assert answer_headers["content-type"] == "application/json", answer[:200]
        message = json.loads(answer)["error"]
        assert isinstance(message, str) and len(message) <= 400, message
        assert "serve-repo" not in message and "Traceback" not in message, message
    assert server.process.poll() is None, "the server died"


FUZZ = settings(max_examples=250, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def test_mutated_inference_requests(fuzzed: ServerProcess, reference: Reference) -> None:
    base = _valid(reference.images(2, seed=1))

    @FUZZ
    @given(request=mutated(base), path=st.sampled_from(PATHS[6:8]))
    def one(request: dict[str, Any], path: str) -> None:
        _judge(fuzzed, "POST", path, json.dumps(request).encode(), {"Content-Type": "application/json"})

    one()


def test_random_json_and_bytes_to_every_route(fuzzed: ServerProcess) -> None:
    bodies = st.one_of(json_values.map(lambda value: json.dumps(value).encode()), st.binary(max_size=300))

    @FUZZ
    @given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]), path=st.sampled_from(PATHS), body=bodies,
           length=st.none() | st.integers(-5, 400).map(str) | st.text(max_size=8),
           encoding=st.sampled_from([None, "gzip", "deflate", "br", "identity", ""]), compress=st.booleans())
    def one(method: str, path: str, body: bytes, length: str | None, encoding: str | None, compress: bool) -> None:
        headers: dict[str, str] = {}
        if length is not None and length.isprintable() and length.isascii():
            headers["Inference-Header-Content-Length"] = length
        if encoding is not None:
            headers["Content-Encoding"] = encoding
            if compress and encoding == "gzip":
                body = gzip.compress(body)
        _judge(fuzzed, method, path, body if method != "GET" else None, headers)

    one()


def test_the_server_serves_the_same_after_the_campaigns(fuzzed: ServerProcess, reference: Reference) -> None:
    pixels = reference.images(3, seed=2)
    status, _, answer = _send(fuzzed, "POST", f"/v2/models/{MODEL}/infer", json.dumps(
        {"inputs": _valid(pixels)["inputs"], "outputs": [{"name": "probabilities"}]}).encode(), {})
    assert status == 200
    served = np.reshape(json.loads(answer)["outputs"][0]["data"], (3, 10))
    np.testing.assert_allclose(served, reference(pixels)["probabilities"], atol=1e-6)
