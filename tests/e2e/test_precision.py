"""Which precision really serves: `valley-serve --precision int8` on real Fashion-MNIST ensembles.

A variant that reproduces its samples on this CPU serves at INT8; one that does not (its graphs calibrated on
blank images, as a variant whose arithmetic differs on this CPU answers) is refused at load, with a warning naming
this CPU and the one it was validated on, and the FP32 graphs serve instead. Model metadata, the model
configuration and `valley_precision_info` say which precision serves and which was asked for.
"""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

from artefact.cpu import cpu_model
from artefact.manifest import load_manifest
from service.launch import ServerProcess
from tests.e2e.conftest import start_server_process, stop_server_process

MODEL = "fashion"


def _precision_info(server: ServerProcess) -> dict[tuple[str, str], float]:
    """valley_precision_info of the model: {(precision, requested): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.labels["precision"], sample.labels["requested"]): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == "valley_precision_info" and sample.labels["model"] == MODEL}


def _served(version: Path) -> tuple[dict[str, str], dict[str, str], np.ndarray, str]:
    """What `valley-serve --precision int8` says and answers for the repository holding `version`: metadata
    parameters, ModelConfig parameters, probabilities of the manifest's samples, and the server's log."""
    repository = version.parent.parent
    server = start_server_process(repository, "--precision", "int8")
    try:
        client = triton.InferenceServerClient(server.url)
        # Over HTTP: tritonclient's copy of the gRPC metadata message has no parameters.
        metadata = triton_http.InferenceServerClient(server.http_url).get_model_metadata(MODEL)
        config = client.get_model_config(MODEL, as_json=True)["config"]
        pixels = np.asarray(load_manifest(version).samples.inputs, dtype=np.uint8)
        inputs = [triton.InferInput("pixels", list(pixels.shape), "UINT8")]
        inputs[0].set_data_from_numpy(pixels)
        answer = client.infer(MODEL, inputs, outputs=[triton.InferRequestedOutput("probabilities")])
        probabilities = answer.as_numpy("probabilities")
        info = _precision_info(server)
    finally:
        log = stop_server_process(server)
    parameters = metadata["parameters"]
    config_parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    config_parameters["default_model_filename"] = config["default_model_filename"]
    assert info == {(parameters["precision"], parameters["precision_requested"]): 1.0}, info
    return parameters, config_parameters, probabilities, log


def _fused(version: Path, file: str, pixels: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(version / file), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(["probabilities"], {"pixels": pixels})[0])


def test_a_variant_that_reproduces_serves_at_int8(fashion_variants: Path, tmp_path: Path) -> None:
    version = tmp_path / MODEL / "1"
    shutil.copytree(fashion_variants, version)
    parameters, config, probabilities, log = _served(version)
    assert parameters["precision"] == parameters["precision_requested"] == "int8"
    assert config["precision"] == "int8" and config["default_model_filename"] == "ensemble.int8.onnx"
    manifest = load_manifest(version)
    variant = manifest.variant("int8")
    assert variant is not None
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    np.testing.assert_allclose(probabilities, _fused(version, variant.fused.file, pixels), atol=1e-6)
    assert "refused" not in log


def test_a_variant_that_does_not_reproduce_is_refused_and_fp32_serves(unreproducible_int8: Path) -> None:
    parameters, config, probabilities, log = _served(unreproducible_int8)
    assert parameters["precision"] == "fp32" and parameters["precision_requested"] == "int8"
    assert config["precision"] == "fp32" and config["default_model_filename"] == "ensemble.onnx"
    manifest = load_manifest(unreproducible_int8)
    pixels = np.asarray(manifest.samples.inputs, dtype=np.uint8)
    np.testing.assert_allclose(probabilities, _fused(unreproducible_int8, manifest.fused.file, pixels), atol=1e-6)
    refusals = [line for line in log.splitlines() if "WARNING service.core.ensemble" in line
                and "int8 variant is refused" in line]
    assert len(refusals) == 1, log
    assert f"This CPU: {cpu_model()}" in refusals[0] and "Validated on:" in refusals[0]


@pytest.fixture(autouse=True)
def _models_named_fashion(fashion_variants: Path) -> None:
    assert load_manifest(fashion_variants).name == MODEL
