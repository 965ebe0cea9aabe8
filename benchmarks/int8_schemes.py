"""INT8 quantization schemes on real images, and whether their answers depend on the CPU.

onnxruntime multiplies uint8 activations by int8 weights with VPMADDUBSW on x86 CPUs without
VNNI (AVX2, AVX-512 without VNNI), which adds pairs of products in 16 bits and saturates;
VNNI and AMX add them in 32 bits (`artefact.cpu`). So one INT8 graph can answer differently on
two CPUs. For an exported version's FP32 member graphs this program quantizes every member with
each scheme (`training.quantize.quantize_int8`, activation ranges from the first 1,024
validation images, as export does) and scores the ensemble of each (the manifest's
temperature, probabilities averaged) on the validation and test splits; `--speed` adds each
scheme's fused graph's images per CPU-second (one thread, batch 32) beside FP32's.

Run it natively first: it writes the graphs, the images and every scheme's answers to WORK.
Then run it again under an emulated CPU with `--answers-of native` (FP32's answers are read
from the native run, which it needs: FP32 convolutions run about a thousand times slower
under emulation) to see which schemes answer the same there:

    python benchmarks/int8_schemes.py --from runs/fm-b24-fge --version-dir runs/ensembles/fashion-mnist-fge/4 \\
        --work runs/int8-schemes --speed
    qemu-x86_64 -cpu EPYC-Rome .venv/bin/python benchmarks/int8_schemes.py \\
        --version-dir runs/ensembles/fashion-mnist-fge/4 --work runs/int8-schemes --tag avx2 --answers-of native

(Debian's qemu-user 7.2 emulates AVX2 but neither AVX-512 nor VNNI; `-cpu EPYC-Rome` is an
AVX2-only AMD EPYC. The header's CPU line comes from /proc/cpuinfo, which qemu-user passes
through from the host: under emulation the CPU is the `-cpu` model.)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import onnxruntime

from artefact.cpu import cpu_features, cpu_model, int8_arithmetic
from artefact.manifest import QuantizationScheme, load_manifest
from artefact.uncertainty import LOG_FLOOR, softmax
from training.quantize import INT8_SCHEME, quantize_int8

# Short name: (what the table calls it, the scheme).
SCHEMES = {
    "8bit": ("u8s8, 8-bit weights (before)", QuantizationScheme(weight_bits=8)),
    "7bit": ("u8s8, 7-bit weights (default)", INT8_SCHEME),
    "u8u8": ("u8u8 (uint8 weights)", QuantizationScheme(weights="uint8", weight_bits=8)),
}
CALIBRATION_IMAGES = 1024
SPEED_BATCH = 32


def session(path: Path) -> onnxruntime.InferenceSession:
    """One thread, no spinning: the same work under emulation and natively, and steady per-CPU-second figures."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ensemble(files: list[Path], pixels: np.ndarray, temperature: float) -> np.ndarray:
    """The tempered ensemble of member graphs: probabilities [N, C] (float64)."""
    members = []
    for file in files:
        run = session(file)
        logits = np.concatenate([run.run(None, {"pixels": pixels[start:start + 256]})[0]
                                 for start in range(0, len(pixels), 256)])
        members.append(softmax(logits.astype(np.float64) / temperature))
    return np.asarray(np.mean(members, axis=0))


def scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Accuracy and NLL."""
    true = probabilities[np.arange(len(labels)), labels]
    return float(np.mean(probabilities.argmax(axis=1) == labels)), float(np.mean(-np.log(np.maximum(true,
                                                                                                   LOG_FLOOR))))


def images_per_cpu_second(path: Path, pixels: np.ndarray, seconds: float = 3.0) -> float:
    run = session(path)
    batch = pixels[:SPEED_BATCH]
    for _ in range(3):
        run.run(["probabilities"], {"pixels": batch})
    calls, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        run.run(["probabilities"], {"pixels": batch})
        calls += 1
    return calls * SPEED_BATCH / (time.process_time() - started)


def load_images(run: Path, work: Path) -> dict[str, np.ndarray]:
    """The validation and test splits as uint8 pixels and labels, cached in WORK for emulated runs (no torch)."""
    cache = work / "images.npz"
    if not cache.exists():
        import torch  # only natively: the emulated run reads the cache

        from training.data import ImageTensors, load_data
        from training.runs import RunDir

        splits = load_data(RunDir(run).read_config().data)
        arrays = {}
        for name, split in (("val", splits.val), ("test", splits.test)):
            assert isinstance(split, ImageTensors)
            arrays[f"{name}_pixels"] = split.images.numpy()
            arrays[f"{name}_labels"] = split.labels.to(torch.int64).numpy()
        np.savez(cache, allow_pickle=False, **arrays)
    with np.load(cache) as loaded:
        return dict(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="run", type=Path, help="the run the version was exported from (its data)")
    parser.add_argument("--version-dir", type=Path, required=True, help="an exported version (its FP32 graphs)")
    parser.add_argument("--work", type=Path, required=True, help="where graphs, images and answers go")
    parser.add_argument("--tag", default="native", help="names this run's answers in WORK")
    parser.add_argument("--answers-of", help="read FP32's answers from the run of this tag instead of computing them")
    parser.add_argument("--speed", action="store_true", help="also measure each fused graph's images per CPU-second")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = parser.parse_args()

    manifest = load_manifest(args.version_dir)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.run is None and not (args.work / "images.npz").exists():
        parser.error("--from is needed the first time (the images are read from its data)")
    images = load_images(args.run, args.work)
    print(f"{date.today()}, {platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs, onnxruntime "
          f"{onnxruntime.__version__}\nINT8-relevant features: {' '.join(cpu_features()) or 'none listed'} "
          f"({int8_arithmetic(cpu_features())})\n{len(manifest.members)} members, temperature "
          f"{manifest.temperature:.4f}; {len(images['val_labels'])} validation, {len(images['test_labels'])} test "
          "images\n")

    graphs: dict[str, list[Path]] = {"FP32": [args.version_dir / m.file for m in manifest.members]}
    fused = {"FP32": args.version_dir / manifest.fused.file}
    for key in args.schemes:
        name, scheme = SCHEMES[key]
        files = [args.work / f"{key}.{m.file}" for m in [*manifest.members, manifest.fused]]
        if not all(file.exists() for file in files):
            calibration = images["val_pixels"][:CALIBRATION_IMAGES]
            for member, file in zip([*manifest.members, manifest.fused], files, strict=True):
                quantize_int8(args.version_dir / member.file, file, calibration, scheme)
        graphs[name], fused[name] = files[:-1], files[-1]

    answers: dict[str, np.ndarray] = {}
    print("| scheme | val accuracy % | val NLL | test accuracy % | test NLL | largest change vs FP32 (test) |"
          + (" images/CPU-s | vs FP32 |" if args.speed else "")
          + (f" largest change vs {args.answers_of} (test) |" if args.answers_of else ""))
    print("|---" * (6 + 2 * args.speed + bool(args.answers_of)) + "|")
    reference = np.load(args.work / f"answers-{args.answers_of}.npz") if args.answers_of else None
    fp32_speed = images_per_cpu_second(fused["FP32"], images["test_pixels"]) if args.speed else 0.0
    for name, files in graphs.items():
        for split in ("val", "test"):
            key = f"{name}/{split}"
            if name == "FP32" and reference is not None:
                answers[key] = reference[key]
            else:
                answers[key] = ensemble(files, images[f"{split}_pixels"], manifest.temperature)
        val, test = (scores(answers[f"{name}/{split}"], images[f"{split}_labels"]) for split in ("val", "test"))
        change = float(np.max(np.abs(answers[f"{name}/test"] - answers["FP32/test"])))
        row = (f"| {name} | {100 * val[0]:.2f} | {val[1]:.4f} | {100 * test[0]:.2f} | {test[1]:.4f} | "
               f"{change:.4f} |")
        if args.speed:
            speed = fp32_speed if name == "FP32" else images_per_cpu_second(fused[name], images["test_pixels"])
            row += f" {speed:,.0f} | {speed / fp32_speed:.2f}x |"
        if reference is not None:
            row += f" {float(np.max(np.abs(answers[f'{name}/test'] - reference[f'{name}/test']))):.2e} |"
        print(row, flush=True)
    np.savez(args.work / f"answers-{args.tag}.npz", allow_pickle=False, **answers)
    print(f"\nanswers: {args.work / f'answers-{args.tag}.npz'}")


if __name__ == "__main__":
    main()
