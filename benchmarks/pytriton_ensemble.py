"""Serve an exported ensemble through a real Triton server with PyTriton: the baseline for valley.

A bound Python function runs the K member graphs with onnxruntime and averages
softmax(logits / temperature), the same result as valley's fused graph, behind Triton's
dynamic batcher. It reads the manifest with plain `json` and imports nothing from this
project: it runs with the PyTriton venv's python (Triton's Python backend needs a venv made
from Debian's own python3.11), made with

    /usr/bin/python3.11 -m venv .venv-pytriton
    .venv-pytriton/bin/pip install nvidia-pytriton onnxruntime numpy

and is started by `benchmarks/serving_throughput.py`, or by hand:

    .venv-pytriton/bin/python benchmarks/pytriton_ensemble.py --version-dir runs/ensembles/fashion-mnist/1 \\
        --port 8101 [--max-batch-size 64] [--max-queue-delay-us 0] [--instances 2] [--intra-threads 1]

The model is `manifest["name"]`: input `manifest["input"]["name"]` UINT8 [B, 1, 28, 28], outputs
`probabilities` FP32 [B, C] and `predicted_class` INT64 [B, 1]. SIGINT or SIGTERM stops Triton
and its Python backend stubs (about 5 s) and removes PyTriton's workspace (`--workspace`). Triton's
own log goes to this script's stdout/stderr.

Threading, the best of what was measured on 2 cores (the defaults): two instances, each owning
single-threaded member sessions that do not spin and run one after the other, so Triton overlaps
two batches on the two cores (batch 32 x 4 in flight: about 1,050 images/s, 0.9x the in-process
fused graph). One instance reached about 530 (one core busy); one instance with 2 non-spinning
threads per session 500-900; spinning pools 230, starving Triton's own processes. The queue delay
(0 to 8 ms) changed nothing beyond the noise at batch 1 x 16 in flight (330-440 images/s).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import onnxruntime
from pytriton.decorators import batch  # type: ignore[import-not-found]
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # type: ignore[import-not-found]
from pytriton.triton import Triton, TritonConfig  # type: ignore[import-not-found]

LOGGER = logging.getLogger("pytriton_ensemble")


class MemberAverage:
    """K onnxruntime member sessions; softmax(logits / T) of each, averaged."""

    def __init__(self, version_dir: Path, manifest: dict[str, Any], intra_threads: int, spinning: bool) -> None:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = intra_threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.sessions = [onnxruntime.InferenceSession(str(version_dir / member["file"]), options,
                                                      providers=["CPUExecutionProvider"])
                         for member in manifest["members"]]
        self.input_name = str(manifest["input"]["name"])
        self.temperature = float(manifest["temperature"])
        self.calls = self.images = 0
        self.seconds = 0.0

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        total: np.ndarray | None = None
        for session in self.sessions:
            logits = session.run(None, {self.input_name: pixels})[0] / self.temperature
            exp = np.exp(logits - logits.max(axis=1, keepdims=True))
            probabilities = exp / exp.sum(axis=1, keepdims=True)
            total = probabilities if total is None else total + probabilities
        assert total is not None
        return (total / len(self.sessions)).astype(np.float32)

    def infer(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        began = time.perf_counter()
        pixels = inputs[self.input_name]
        probabilities = self.probabilities(pixels)
        self.calls, self.images = self.calls + 1, self.images + len(pixels)
        self.seconds += time.perf_counter() - began
        return {"probabilities": probabilities,
                "predicted_class": probabilities.argmax(axis=1).astype(np.int64)[:, None]}


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # Triton.serve() stops the server and cleans up on KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, required=True, help="folder with manifest.json and the graphs")
    parser.add_argument("--port", type=int, required=True, help="gRPC port")
    parser.add_argument("--http-port", type=int, default=0, help="HTTP port (default: --port + 1)")
    parser.add_argument("--metrics-port", type=int, default=0, help="metrics port (default: --port + 2)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-queue-delay-us", type=int, default=0,
                        help="how long the dynamic batcher may hold a request to fill a batch")
    parser.add_argument("--instances", type=int, default=2, help="model instances (Triton runs them concurrently)")
    parser.add_argument("--intra-threads", type=int, default=1, help="onnxruntime intra-op threads per session")
    parser.add_argument("--spinning", action="store_true", help="let onnxruntime's intra-op threads spin")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--workspace", type=Path,
                        help="PyTriton's workspace: sockets, model store, a copy of tritonserver (default: a new "
                             "folder under ~/.cache/pytriton); removed on a clean stop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    manifest = json.loads((args.version_dir / "manifest.json").read_text())
    classes = len(manifest["classes"])
    pixels = Tensor(name=manifest["input"]["name"], dtype=np.uint8, shape=tuple(manifest["input"]["shape"][1:]))
    models = [MemberAverage(args.version_dir, manifest, args.intra_threads, args.spinning)
              for _ in range(args.instances)]
    infer_functions: list[Callable[..., dict[str, np.ndarray]]] = [batch(model.infer) for model in models]
    config = TritonConfig(grpc_port=args.port, http_port=args.http_port or args.port + 1,
                          metrics_port=args.metrics_port or args.port + 2, log_verbose=args.log_verbose)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    with Triton(config=config, workspace=args.workspace) as triton:
        triton.bind(
            model_name=manifest["name"],
            model_version=int(manifest["version"]),
            infer_func=infer_functions,
            inputs=[pixels],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(classes,)),
                     Tensor(name="predicted_class", dtype=np.int64, shape=(1,))],
            config=ModelConfig(max_batch_size=args.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=args.max_queue_delay_us)),
            strict=False,
        )
        LOGGER.info("serving %s (%d members, %d instances) on gRPC port %d", manifest["name"],
                    len(manifest["members"]), args.instances, args.port)
        triton.serve()
    for index, model in enumerate(models):
        LOGGER.info("instance %d: %d batches, %d images (mean batch %.1f), %.1f s in the members",
                    index, model.calls, model.images, model.images / max(model.calls, 1), model.seconds)


if __name__ == "__main__":
    main()
