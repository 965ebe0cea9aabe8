"""`valley-reload`: make every running server load the newest version of an ensemble.

    valley-reload --target valley-serve-pods.valley.svc:8001 --model fashion-mnist-fge

A training job that has just written `<repository>/<model>/<N+1>/` calls this. `--target`'s host
may resolve to many addresses (a Kubernetes headless Service gives one per pod): each address
gets the Open Inference Protocol's RepositoryModelLoad, which loads the newest version on disk
beside the one serving, verifies it and swaps it in (a refused version leaves the old one
serving). One JSON line per server says which version it serves now. Exits 0 when every server
loaded the newest version and all serve the same one, 1 when one refused it, could not be
reached or serves another version, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import grpc

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class Outcome:
    """What one server answered."""

    address: str
    ok: bool
    version: str = ""
    error: str = ""


def addresses(target: str) -> list[str]:
    """Every `ip:port` that `host:port` resolves to, in a stable order (one per pod behind a headless Service).

    IPv4 addresses where there are any, else IPv6.
    """
    host, separator, port = target.rpartition(":")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target {target!r}: expected HOST:PORT, the port 1 to 65535")
    host = host.strip("[]")
    found = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    # A dual-stack pod has an address of each family; the server binds one (0.0.0.0 in the images).
    families = {info[0] for info in found}
    family = socket.AF_INET if socket.AF_INET in families else socket.AF_INET6
    ips = sorted({str(info[4][0]) for info in found if info[0] == family})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


def reload_one(address: str, model: str, timeout: float, metadata: list[tuple[str, str]]) -> Outcome:
    """Ask one server to load the newest version of `model`; then which version it serves."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=timeout,
                                     metadata=metadata)
            answer = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout, metadata=metadata)
    except grpc.RpcError as error:
        return Outcome(address, False, error=f"{error.code().name}: {error.details()}")
    return Outcome(address, True, version=answer.versions[0] if answer.versions else "")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="valley-reload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the servers' gRPC port; every address the "
                        "host resolves to is reloaded")
    parser.add_argument("--model", required=True, help="ensemble name in the repository")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one server may take to load (300)")
    parser.add_argument("--token-file", help="file holding a bearer token, sent as 'authorization: Bearer ...'")
    args = parser.parse_args(argv)
    metadata: list[tuple[str, str]] = []
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as file:
                metadata.append(("authorization", f"Bearer {file.read().strip()}"))
        except OSError as error:
            parser.error(f"--token-file: {error.strerror}")
    try:
        targets = addresses(args.target)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        print(json.dumps({"target": args.target, "ok": False, "error": f"cannot resolve: {error}"}))
        raise SystemExit(1) from None
    outcomes = [reload_one(address, args.model, args.timeout, metadata) for address in targets]
    for outcome in outcomes:
        print(json.dumps({"model": args.model, **asdict(outcome)}), flush=True)
    if not all(outcome.ok for outcome in outcomes):
        raise SystemExit(1)
    if len({outcome.version for outcome in outcomes}) > 1:
        print(json.dumps({"model": args.model, "ok": False, "error": "the servers serve different versions"}))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
