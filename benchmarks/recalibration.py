"""Recalibration from feedback on a shifted stream, through a real server: live ECE before and after.

For each corruption of the Fashion-MNIST test split (`training.corruptions`), a fresh
`valley-serve` on a copy of `--version-dir` answers the first half of the shifted images (each
request with an id), gets their labels through valley.v1.Feedback, suggests a temperature
(valley.v1.Calibration/Suggest), applies it (Recalibrate: a new version, swapped in), then answers
and gets labels for the second half, which the fit never saw. The table compares the ECE,
NLL and accuracy of the second half under the recalibrated version with its own under
the exported one: the held-out half is first served by the exported version without ids (its
answers scored here), then by the recalibrated one with labels (scored by the server's own
calibration window, `valley_live_metric`).

    python benchmarks/recalibration.py --version-dir runs/ensembles/fashion-mnist-fge/3 \\
        --corruption gaussian_noise:3 --corruption contrast:3 --corruption rotation:3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from artefact.manifest import load_manifest  # noqa: E402
from service._proto.valley.v1 import calibration_pb2 as calibration_pb  # noqa: E402
from service._proto.valley.v1 import calibration_pb2_grpc as calibration_grpc  # noqa: E402
from service._proto.valley.v1 import feedback_pb2 as feedback_pb  # noqa: E402
from service._proto.valley.v1 import feedback_pb2_grpc as feedback_grpc  # noqa: E402
from service.control.recalibrate import quality  # noqa: E402
from service.launch import ServerProcess, start_server  # noqa: E402
from training.corruptions import corrupt  # noqa: E402
from training.data import load_splits  # noqa: E402

BATCH = 64


def _test_split() -> tuple[np.ndarray, np.ndarray]:
    test = load_splits("fashion-mnist").test
    return test.images.numpy(), test.labels.numpy()  # type: ignore[attr-defined]


def _serve(server: ServerProcess, model: str, pixels: np.ndarray, labels: np.ndarray | None, tag: str
           ) -> tuple[str, np.ndarray]:
    """Send the images in requests (with ids, and their labels reported, when `labels` are given); the version
    that answered and its probabilities."""
    client = triton.InferenceServerClient(server.url)
    answered, versions = [], set()
    with grpc.insecure_channel(server.url) as channel:
        feedback = feedback_grpc.FeedbackStub(channel)  # type: ignore[no-untyped-call]
        for start in range(0, len(pixels), BATCH):
            request_id = f"{tag}-{start}" if labels is not None else ""
            result = client.infer(model, [_input(pixels[start:start + BATCH])], request_id=request_id,
                                  outputs=[triton.InferRequestedOutput("probabilities")],
                                  parameters={"members": "full"})
            versions.add(result.get_response().model_version)
            answered.append(result.as_numpy("probabilities"))
            if labels is not None:
                feedback.Report(feedback_pb.ReportRequest(labels=[
                    feedback_pb.Label(model_name=model, request_id=request_id, position=row,
                                      true_class=int(labels[start + row])) for row in range(len(answered[-1]))]),
                    timeout=30)
    if len(versions) != 1:
        raise RuntimeError(f"one version was expected to answer the stream, {sorted(versions)} did")
    return versions.pop(), np.concatenate(answered)


def _input(pixels: np.ndarray) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels)
    return tensor


def _live(server: ServerProcess, model: str, version: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {sample.labels["metric"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "valley_live_metric"
            and sample.labels["model"] == model and sample.labels["version"] == version}


def _one(version_dir: Path, corruption: str, severity: int, pixels: np.ndarray, labels: np.ndarray,
         seed: int) -> dict[str, float | str | int]:
    manifest = load_manifest(version_dir)
    shifted = pixels if corruption == "clean" else corrupt(pixels, corruption, severity, seed)
    half = len(shifted) // 2
    with tempfile.TemporaryDirectory(prefix="valley-recalibration-") as folder:
        repository = Path(folder) / "repository"
        shutil.copytree(version_dir, repository / manifest.name / str(manifest.version))
        flags = ("--members", "full", "--calibration-window", str(half), "--recalibration-min-labels", "100",
                 "--feedback-max-predictions", str(len(shifted)))
        server = start_server(repository, *flags, log=Path(folder) / "serve.log", cwd=ROOT)
        try:
            first_version, _ = _serve(server, manifest.name, shifted[:half], labels[:half], "first")
            fitted_on = _live(server, manifest.name, first_version)
            # The held-out half as the exported version answers it (no ids: these answers are not labelled).
            _, held_out = _serve(server, manifest.name, shifted[half:], None, "held-out")
            before = quality(held_out, labels[half:])
            with grpc.insecure_channel(server.url) as channel:
                calibration = calibration_grpc.CalibrationStub(channel)  # type: ignore[no-untyped-call]
                started = time.perf_counter()
                answer = calibration.Recalibrate(calibration_pb.RecalibrateRequest(model_name=manifest.name),
                                                 timeout=300)
                seconds = time.perf_counter() - started
            second_version, _ = _serve(server, manifest.name, shifted[half:], labels[half:], "second")
            after = _live(server, manifest.name, second_version)
        finally:
            server.stop()
    suggestion = answer.suggestion
    return {"corruption": corruption, "severity": severity if corruption != "clean" else 0,
            "temperature": suggestion.temperature, "suggested": suggestion.suggested_temperature,
            "seconds": seconds, "published": answer.published_version,
            "ece_fitted_on": fitted_on["ece"], "ece_fit": suggestion.suggested.ece,
            "ece_before": before["ece"], "nll_before": before["nll"], "accuracy_before": before["accuracy"],
            "ece_after": after["ece"], "nll_after": after["nll"], "accuracy_after": after["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version-dir", type=Path, required=True, help="an exported ensemble version")
    parser.add_argument("--corruption", action="append", default=[],
                        help="NAME:SEVERITY, repeatable (default clean:0, gaussian_noise:3, contrast:3, rotation:3, "
                             "gaussian_blur:3)")
    parser.add_argument("--images", type=int, default=10_000, help="test images used, shuffled (half to fit)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    pixels, labels = _test_split()
    order = np.random.default_rng(args.seed).permutation(len(pixels))[:args.images]
    pixels, labels = pixels[order], labels[order]
    runs = [(name, int(level)) for name, _, level in (item.partition(":") for item in
                                                      args.corruption or ["clean:0", "gaussian_noise:3", "contrast:3",
                                                                          "rotation:3", "gaussian_blur:3"])]
    rows = [_one(args.version_dir, name, severity, pixels, labels, args.seed)
            for name, severity in tqdm(runs, desc="shifted streams", unit="stream")]
    print(f"\n{len(pixels) // 2} images to fit on, {len(pixels) - len(pixels) // 2} held out; live metrics from "
          "the server's calibration window\n")
    print("| stream | T exported -> fitted | ECE on the fitted half: served -> fitted T | held-out ECE before -> "
          "after | held-out NLL before -> after | held-out accuracy before -> after | Recalibrate RPC |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        name = "clean" if row["corruption"] == "clean" else f"{row['corruption']} {row['severity']}"
        print(f"| {name} | {row['temperature']:.3f} -> {row['suggested']:.3f} | {row['ece_fitted_on']:.2%} -> "
              f"{row['ece_fit']:.2%} | {row['ece_before']:.2%} -> {row['ece_after']:.2%} | "
              f"{row['nll_before']:.4f} -> {row['nll_after']:.4f} | "
              f"{row['accuracy_before']:.2%} -> {row['accuracy_after']:.2%} | {row['seconds']:.1f} s |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
