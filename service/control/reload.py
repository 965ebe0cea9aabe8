"""`valley-reload`: make every running server load the newest version of an ensemble.

    valley-reload --target valley-serve-pods.valley.svc:8001 --model fashion-mnist-fge \
        [--tls-ca ca.crt [--tls-client-cert tls.crt --tls-client-key tls.key]] [--token-file admin-token]

A training job that has just written `<repository>/<model>/<N+1>/` calls this. `--target`'s host
may resolve to many addresses (a Kubernetes headless Service gives one per pod): each address
gets the Open Inference Protocol's RepositoryModelLoad, which loads the newest version on disk
beside the one serving, verifies it and swaps it in (a refused version leaves the old one
serving). One JSON line per server says which version it serves now. Exits 0 when every server
loaded the newest version and all serve the same one, 1 when one refused it, could not be
reached or serves another version, 2 on bad arguments.

With `--tls-ca` the servers are reached over TLS and their certificate is checked against the
target's host name (the addresses are pod IPs, which certificates do not name), or against
`--tls-server-name`; a client certificate is sent for mutual TLS. The token needs the admin role.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
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


@dataclass(frozen=True)
class Transport:
    """How the servers are reached: plaintext (no credentials) or TLS, checked against `server_name`."""

    credentials: grpc.ChannelCredentials | None = None
    server_name: str = ""

    def channel(self, address: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(address)
        return grpc.secure_channel(address, self.credentials,
                                   options=[("grpc.ssl_target_name_override", self.server_name)])


def reload_one(address: str, model: str, timeout: float, metadata: list[tuple[str, str]],
               transport: Transport = Transport()) -> Outcome:
    """Ask one server to load the newest version of `model`; then which version it serves (the newest)."""
    try:
        with transport.channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=timeout,
                                     metadata=metadata)
            answer = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=timeout, metadata=metadata)
    except grpc.RpcError as error:
        return Outcome(address, False, error=f"{error.code().name}: {error.details()}")
    return Outcome(address, True, version=answer.versions[-1] if answer.versions else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valley-reload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the servers' gRPC port; every address the "
                        "host resolves to is reloaded")
    parser.add_argument("--model", required=True, help="ensemble name in the repository")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one server may take to load (300)")
    parser.add_argument("--token-file", help="file holding a bearer token with the admin role, sent as "
                        "'authorization: Bearer ...'")
    parser.add_argument("--tls-ca", help="PEM CA bundle that signed the servers' certificate: reach them over TLS")
    parser.add_argument("--tls-client-cert", help="PEM client certificate, for servers that ask for one (mTLS)")
    parser.add_argument("--tls-client-key", help="PEM private key of --tls-client-cert")
    parser.add_argument("--tls-server-name", help="the name the servers' certificate must carry (default: the "
                        "target's host)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    metadata: list[tuple[str, str]] = []
    files: dict[str, bytes] = {}
    for flag in ("token_file", "tls_ca", "tls_client_cert", "tls_client_key"):
        if getattr(args, flag):
            try:
                with open(getattr(args, flag), "rb") as file:
                    files[flag] = file.read()
            except OSError as error:
                parser.error(f"--{flag.replace('_', '-')}: {error.strerror}")
    if "token_file" in files and "tls_ca" not in files:
        print("valley-reload: warning: sending the token without TLS (no --tls-ca): anyone on the path can read it",
              file=sys.stderr)
    if "token_file" in files:
        metadata.append(("authorization", f"Bearer {files['token_file'].decode('utf-8', 'replace').strip()}"))
    if ("tls_client_cert" in files) != ("tls_client_key" in files) or ("tls_client_cert" in files
                                                                        and "tls_ca" not in files):
        parser.error("--tls-client-cert and --tls-client-key go together, with --tls-ca")
    transport = Transport()
    if "tls_ca" in files:
        credentials = grpc.ssl_channel_credentials(files["tls_ca"], files.get("tls_client_key"),
                                                   files.get("tls_client_cert"))
        transport = Transport(credentials, args.tls_server_name or args.target.rpartition(":")[0].strip("[]"))
    try:
        targets = addresses(args.target)
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        print(json.dumps({"target": args.target, "ok": False, "error": f"cannot resolve: {error}"}))
        raise SystemExit(1) from None
    outcomes = [reload_one(address, args.model, args.timeout, metadata, transport) for address in targets]
    for outcome in outcomes:
        print(json.dumps({"model": args.model, **asdict(outcome)}), flush=True)
    if not all(outcome.ok for outcome in outcomes):
        raise SystemExit(1)
    if len({outcome.version for outcome in outcomes}) > 1:
        print(json.dumps({"model": args.model, "ok": False, "error": "the servers serve different versions"}))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
