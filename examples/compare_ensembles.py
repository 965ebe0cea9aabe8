"""Serve several ensembles side by side and compare them on the Fashion-MNIST test split, as served.

    python examples/compare_ensembles.py --serve runs/demo/ensembles \\
        --model fashion-mnist-single --model fashion-mnist-fge --model fashion-mnist-curve \\
        --budget fashion-mnist-single=30 --budget fashion-mnist-fge=30 --budget fashion-mnist-curve=90

Starts `valley-serve` on the repository, sends every test image to every model through the
unmodified tritonclient, and prints one table: accuracy, NLL, ECE and Brier of the probabilities
the server returned (each ensemble's fitted temperature applied; by default each is answered by
its anytime ensemble, so the members run per image are shown too), next to NLL and ECE before
temperature scaling (from each manifest's offline metrics), and how often the prediction set the
server answered at the model's default coverage held the true class, and its mean size.
`--budget NAME=EPOCHS` adds the training epochs each model cost. Needs valley with its `train`,
`serve` and `client` extras (what `make setup-demo` installs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton
from tqdm import tqdm

from artefact.manifest import Metrics, load_manifest
from artefact.metrics import classification_metrics
from service.launch import Credentials, start_server, throwaway_credentials
from training.data import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def served_answers(url: str, model: str, images: np.ndarray, batch_size: int, credentials: Credentials,
                   sets: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The probabilities the server answered for every image, how many members answered each, and (`sets`) the
    prediction sets at the model's default coverage."""
    client = triton.InferenceServerClient(url, ssl=True, root_certificates=str(credentials.ca))
    names = ["probabilities", "members_used", *(["prediction_set"] if sets else [])]
    outputs = [triton.InferRequestedOutput(name) for name in names]
    answers: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in tqdm(range(0, len(images), batch_size), desc=model, unit="batch", leave=False):
        pixels = images[start:start + batch_size]
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        result = client.infer(model, [tensor], outputs=outputs, headers=credentials.headers)
        for name in names:
            answers[name].append(result.as_numpy(name))
    joined = {name: np.concatenate(parts) for name, parts in answers.items()}
    return joined["probabilities"], joined["members_used"], joined.get("prediction_set")


def _latest_version(repository: Path, model: str) -> Path:
    versions = sorted((p for p in (repository / model).iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"{repository / model} holds no version")
    return versions[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=Path, required=True, metavar="REPOSITORY")
    parser.add_argument("--model", action="append", required=True, dest="models", help="repeatable")
    parser.add_argument("--budget", action="append", default=[], metavar="NAME=EPOCHS",
                        help="training epochs a model cost, for the table (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per request (the server takes up to 64)")
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST)
    args = parser.parse_args()
    budgets = dict(item.split("=", 1) for item in args.budget)
    images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")[:, None]
    labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64)

    rows = ["| model | method | members | members per image served | epochs | accuracy % | NLL | ECE % | Brier "
            "| NLL, ECE % before temperature | prediction sets: coverage %, mean size |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    results = {}
    # The server runs as in production: TLS, and a bearer token (a throwaway certificate and token here).
    with tempfile.TemporaryDirectory(prefix="valley-pki-") as folder:
        credentials = throwaway_credentials(Path(folder))
        with start_server(args.serve, "--log-level", "WARNING", *credentials.flags,
                          cwd=Path(__file__).resolve().parents[1]) as server:
            if not server.ready:
                raise SystemExit(f"valley-serve started but not every ensemble in {args.serve} loaded (see its log)")
            for model in args.models:
                manifest = load_manifest(_latest_version(args.serve, model))
                conformal = manifest.conformal
                probabilities, used, sets = served_answers(f"localhost:{server.grpc_port}", model, images,
                                                           args.batch_size, credentials, conformal is not None)
                served = classification_metrics(probabilities, labels)
                results[model] = served
                before = manifest.metrics.uncalibrated
                held = "(exported without them)"
                if sets is not None and conformal is not None:
                    covered = sets[np.arange(len(labels)), labels].mean()
                    held = (f"{100 * covered:.1f} at {100 * conformal.default_coverage:g} % "
                            f"({conformal.default_score}), {sets.sum(axis=1).mean():.2f} classes")
                rows.append(f"| {model} | {manifest.method} | {len(manifest.members)} | {used.mean():.2f} | "
                            f"{budgets.get(model, '?')} | "
                            f"{100 * served.accuracy:.2f} | {served.nll:.4f} | {100 * served.ece:.2f} | "
                            f"{served.brier:.4f} | {before.nll:.4f}, {100 * before.ece:.2f} | {held} |")
    print(f"\nFashion-MNIST test split ({len(labels)} images), as served by valley (temperature applied):\n")
    print("\n".join(rows))
    baseline, *others = args.models
    for model in others:
        worse = [name for name in ("accuracy", "nll", "ece") if _worse(results[model], results[baseline], name)]
        verdict = ("beats" if not worse else f"does not beat ({', '.join(worse)} worse than)")
        print(f"{model} {verdict} {baseline} on accuracy, NLL and ECE")
    print("(one seed, one budget: docs/results.md has the measured studies behind these budgets)")


def _worse(candidate: Metrics, baseline: Metrics, name: str) -> bool:
    value, reference = getattr(candidate, name), getattr(baseline, name)
    return bool(value < reference) if name == "accuracy" else bool(value > reference)


if __name__ == "__main__":
    main()
