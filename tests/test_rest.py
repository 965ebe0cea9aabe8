"""The HTTP port's parts on their own: its socket, the JSON and binary tensor codec, the classification strings."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest

from service.core.classification import class_count, top_classes
from service.core.inference import Framing
from service.core.tensors import Expect
from service.core.tensors import decode as decode_tensors
from service.errors import InvalidInput
from service.transport.jsoncodec import Body, binary_outputs, encode, frame, parse_body
from service.transport.rest import _listening_socket


def test_connections_to_the_http_port_send_small_writes_at_once() -> None:
    """Nagle's algorithm is off on every accepted connection (asyncio turns it off only on IPPROTO_TCP sockets):
    else an answer's body waits for the client's delayed ACK of its headers, 40 ms per request."""

    async def accepted_nodelay() -> int:
        found: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                found.set_result(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                               socket.TCP_NODELAY))

        listening = _listening_socket("127.0.0.1", 0)
        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        _, writer = await asyncio.open_connection("127.0.0.1", listening.getsockname()[1])
        try:
            return await asyncio.wait_for(found, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_taken_port_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            _listening_socket("127.0.0.1", port)


def decode(body: Body, expect: Expect) -> tuple[dict[str, np.ndarray], Framing]:
    """What the server does with an HTTP request's tensors: framed by the JSON codec, decoded by the core."""
    framed = frame(body)
    return decode_tensors(framed[0], expect), framed


def _expect_pixels(name: str, datatype: str, shape: tuple[int, ...]) -> None:
    if (name, datatype, shape[1:]) != ("pixels", "UINT8", (1, 2, 2)):
        raise InvalidInput("not the model's input")


def test_json_data_flat_or_nested_and_binary_data_decode_alike() -> None:
    pixels = np.arange(8, dtype=np.uint8).reshape(2, 1, 2, 2)
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [2, 1, 2, 2]}
    nested = decode(Body({"inputs": [{**tensor, "data": pixels.tolist()}]}, memoryview(b"")), _expect_pixels)
    flat = decode(Body({"inputs": [{**tensor, "data": pixels.ravel().tolist()}],
                        "outputs": [{"name": "probabilities", "parameters": {"classification": 2}}]},
                       memoryview(b"")), _expect_pixels)
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 8}}]}).encode()
    binary = decode(parse_body(header + pixels.tobytes(), str(len(header))), _expect_pixels)
    for arrays, _ in (nested, flat, binary):
        np.testing.assert_array_equal(arrays["pixels"], pixels)
        assert arrays["pixels"].dtype == np.uint8
    assert flat[1][1:] == (("probabilities",), {"probabilities": 2})


def test_the_model_checks_a_declaration_before_any_data_is_read() -> None:
    seen: list[tuple[int, ...]] = []

    def refuse(name: str, datatype: str, shape: tuple[int, ...]) -> None:
        seen.append(shape)
        raise InvalidInput("too large")

    body = Body({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [10**6, 1, 2, 2], "data": "x"}]},
                memoryview(b""))
    with pytest.raises(InvalidInput, match="too large"):
        decode(body, refuse)
    assert seen == [(10**6, 1, 2, 2)]


def test_answers_in_json_and_binary() -> None:
    outputs = {"probabilities": np.array([[0.25, 0.75]], np.float32), "abstain": np.array([True]),
               "top": np.array([[b"0.750000:1:b"]], dtype=object)}
    text, length = encode("m", "1", "id-1", outputs, {"members": "full"}, False)
    assert length is None
    answer = json.loads(text)
    assert answer["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
                                 {"name": "abstain", "datatype": "BOOL", "shape": [1], "data": [True]},
                                 {"name": "top", "datatype": "BYTES", "shape": [1, 1], "data": ["0.750000:1:b"]}]
    assert (answer["id"], answer["parameters"]) == ("id-1", {"members": "full"})
    body, length = encode("m", "1", "", outputs, {}, {"probabilities", "top"})
    assert length is not None
    described = json.loads(body[:length])["outputs"]
    assert described[0]["parameters"] == {"binary_data_size": 8} and "data" not in described[0]
    assert described[1]["data"] == [True]
    assert body[length:] == outputs["probabilities"].tobytes() + (12).to_bytes(4, "little") + b"0.750000:1:b"


def test_which_outputs_go_back_binary() -> None:
    assert binary_outputs({}, True) is True and binary_outputs({"outputs": []}, False) is False
    header = {"outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]}
    assert binary_outputs(header, False) == {"a"}
    assert binary_outputs(header, True) == {"a", "b"}


def test_top_classes_are_triton_s_strings_in_falling_order() -> None:
    scores = np.array([[0.1, 0.5, 0.1, 0.3], [0.25, 0.25, 0.25, 0.25]], np.float32)
    strings = top_classes(scores, 3, ["a", "b", "c", "d"])
    assert strings.tolist() == [[b"0.500000:1:b", b"0.300000:3:d", b"0.100000:0:a"],
                                [b"0.250000:0:a", b"0.250000:1:b", b"0.250000:2:c"]], "ties by class index"
    assert top_classes(scores, 9, ["a", "b", "c", "d"]).shape == (2, 4), "at most every class"
    assert top_classes(scores[:1], 1, ["a", ""])[0, 0] == b"0.500000:1", "no label: score:index"
    assert top_classes(np.zeros((0, 4), np.float32), 2, []).shape == (0, 2)


@pytest.mark.parametrize(("output", "value", "words"), [
    ("probabilities", True, "must be an integer"), ("probabilities", 2.5, "must be an integer"),
    ("probabilities", -1, "0 (no classification) or a positive"), ("entropy", 2, "applies to 'probabilities'")])
def test_class_counts_that_cannot_be_served(output: str, value: object, words: str) -> None:
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(").replace(")", r"\)")):
        class_count(output, value)
    assert class_count("entropy", 0) == 0 and class_count("probabilities", 5) == 5
