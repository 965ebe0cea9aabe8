"""Classify Fashion-MNIST test images with a running valley server, through the unmodified tritonclient.

    python examples/classify.py --url localhost:8001 --model fashion-mnist-fge [--tls-ca ca.crt] [--token-file token]
    python examples/classify.py --url localhost:8000 --protocol http --model fashion-mnist-fge   # HTTP/REST
    python examples/classify.py --serve runs/demo/ensembles --model fashion-mnist-fge   # starts and stops valley-serve

Prints the accuracy, the mean of each uncertainty output and the top three classes of the first
image by name (the classification extension). Needs only valley's `client` extra (`pip install
'valley-ensembles[client]'`: tritonclient[grpc,http], numpy, tqdm; no torch): it is what a client
team's code looks like, over gRPC (`tritonclient.grpc`) or HTTP (`tritonclient.http`, the same
calls). `--serve` also needs valley's `serve` extra: it starts `valley-serve` on port 0 through
`service.launch`, which learns the ports the server bound from its ready file, with TLS and a
bearer token as in production (a throwaway certificate and token, made with openssl).
"""

from __future__ import annotations

import argparse
import gzip
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import tritonclient.grpc
import tritonclient.http
from tqdm import tqdm

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
OUTPUTS = ["predicted_class", "confidence", "entropy", "mutual_information", "member_disagreement"]


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX file (gzipped): the format of MNIST and Fashion-MNIST."""
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def classify(url: str, model: str, images: np.ndarray, labels: np.ndarray, batch_size: int,
             ca: Path | None = None, token: str = "", protocol: str = "grpc") -> None:
    """`ca`: the PEM CA bundle of a TLS server; `token`: a bearer token with the infer role; `protocol`: grpc or
    http (the HTTP/REST port)."""
    triton: ModuleType = tritonclient.http if protocol == "http" else tritonclient.grpc
    if protocol == "http":
        client = triton.InferenceServerClient(url, ssl=ca is not None,
                                              ssl_options={"ca_certs": str(ca)} if ca else None)
    else:
        client = triton.InferenceServerClient(url, ssl=ca is not None, root_certificates=str(ca) if ca else None)
    headers = {"authorization": f"Bearer {token}"} if token else None
    outputs = [triton.InferRequestedOutput(name) for name in OUTPUTS]
    collected: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUTS}
    started = time.perf_counter()
    for start in tqdm(range(0, len(images), batch_size), desc=f"classifying with {model}", unit="batch"):
        pixels = images[start:start + batch_size]
        tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
        tensor.set_data_from_numpy(pixels)
        result = client.infer(model, [tensor], outputs=outputs, headers=headers)
        for name in OUTPUTS:
            collected[name].append(result.as_numpy(name))
    seconds = time.perf_counter() - started
    values = {name: np.concatenate(parts) for name, parts in collected.items()}
    accuracy = float(np.mean(values["predicted_class"] == labels))
    print(f"{len(images)} test images in {seconds:.1f} s ({len(images) / seconds:,.0f} images/s)")
    print(f"accuracy            {accuracy:.2%}")
    for name in OUTPUTS[1:]:
        print(f"mean {name:<19} {values[name].mean():.4f}")
    wrong = values["predicted_class"] != labels
    print(f"mean confidence when right / wrong: {values['confidence'][~wrong].mean():.3f} / "
          f"{values['confidence'][wrong].mean():.3f}")
    tensor = triton.InferInput("pixels", list(images[:1].shape), "UINT8")
    tensor.set_data_from_numpy(images[:1])
    top = client.infer(model, [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=3)],
                       headers=headers).as_numpy("probabilities")[0]
    print(f"first image (a {labels[0]}), top classes: {', '.join(item.decode() for item in top)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, HOST:PORT")
    where.add_argument("--serve", type=Path, metavar="REPOSITORY", help="start valley-serve on this repository")
    parser.add_argument("--model", default="fashion-mnist-fge", help="an ensemble the server serves")
    parser.add_argument("--images", type=int, default=10_000, help="how many test images (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=FASHION_MNIST)
    parser.add_argument("--tls-ca", type=Path, help="with --url: the CA bundle of the server's TLS certificate")
    parser.add_argument("--token-file", type=Path, help="with --url: a file holding a bearer token (infer role)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="gRPC (the server's --grpc-port) or HTTP/REST (its --http-port)")
    args = parser.parse_args()
    images = read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz")[:args.images, None]
    labels = read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz")[:args.images].astype(np.int64)
    if args.url:
        token = args.token_file.read_text().strip() if args.token_file else ""
        classify(args.url, args.model, images, labels, args.batch_size, args.tls_ca, token, args.protocol)
        return
    from service.launch import start_server, throwaway_credentials  # only --serve needs valley itself

    with tempfile.TemporaryDirectory(prefix="valley-pki-") as folder:
        credentials = throwaway_credentials(Path(folder))
        with start_server(args.serve, "--log-level", "WARNING", *credentials.flags,
                          cwd=Path(__file__).resolve().parents[1]) as server:
            if not server.ready:
                raise SystemExit(f"valley-serve started but not every ensemble in {args.serve} loaded (see its log)")
            port = server.http_port if args.protocol == "http" else server.grpc_port
            classify(f"localhost:{port}", args.model, images, labels, args.batch_size, credentials.ca,
                     credentials.token, args.protocol)


if __name__ == "__main__":
    main()
