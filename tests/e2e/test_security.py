"""TLS, mutual TLS and bearer tokens with roles, through the unmodified tritonclient (sync, aio, streaming)."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
import tritonclient.http as triton_http
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from service.cli import parse_settings
from service.launch import throwaway_credentials
from service.transport.security import RECHECK_S
from tests.conftest import REPO
from tests.e2e.conftest import (
    MODEL,
    Reference,
    ThreadServer,
    health_status,
    http_inputs,
    report,
    start_server_process,
    stop_server_process,
    thread_settings,
    triton_inputs,
)

INFER, FEEDBACK, ADMIN = "infer-token-0123456789", "feedback-token-0123456789", "admin-token-0123456789"
# Two client teams, each inferring and labelling what it was served.
TEAM_A, TEAM_B = "team-a-token-0123456789", "team-b-token-0123456789"


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _signed(name: str, extensions: str, folder: Path) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=folder)
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throw-away CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=valley test CA", cwd=folder)
    _signed("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n", folder)
    _signed("client", "extendedKeyUsage=clientAuth\n", folder)
    return Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt",
                        folder / "client.key")


@pytest.fixture()
def tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# who may do what\n{INFER} infer\n{FEEDBACK} feedback   # labels, infers nothing\n{ADMIN} admin\n"
                    f"{TEAM_A} infer,feedback\n{TEAM_B} infer,feedback\n")
    return path


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _code(error: InferenceServerException) -> str:
    return str(error.status()).removeprefix("StatusCode.")


@pytest.fixture()
def secured(repository: Path, certificates: Certificates, tokens: Path) -> Iterator[ThreadServer]:
    settings = thread_settings(repository, tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                               tokens_file=tokens)
    with ThreadServer(settings) as server:
        yield server


def _client(server: ThreadServer, certificates: Certificates, **extra: Any) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(server.url, ssl=True, root_certificates=str(certificates.ca), **extra)


def test_tls_with_tokens_serves_who_may_and_refuses_who_may_not(secured: ThreadServer, certificates: Certificates,
                                                               reference: Reference) -> None:
    client = _client(secured, certificates)
    pixels = reference.images(4, seed=11)
    result = client.infer(MODEL, triton_inputs(pixels), headers=_bearer(INFER), request_id="tls-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(pixels)["probabilities"], rtol=1e-5,
                               atol=1e-6)
    assert client.get_model_metadata(MODEL, headers=_bearer(FEEDBACK)).name == MODEL, "any token reads metadata"
    refusals: dict[str, tuple[Callable[[], object], str]] = {
        "no token": (lambda: client.infer(MODEL, triton_inputs(pixels)), "UNAUTHENTICATED"),
        "wrong token": (lambda: client.infer(MODEL, triton_inputs(pixels), headers=_bearer("x" * 22)),
                        "UNAUTHENTICATED"),
        "not bearer": (lambda: client.infer(MODEL, triton_inputs(pixels), headers={"authorization": INFER}),
                       "UNAUTHENTICATED"),
        "feedback token infers": (lambda: client.infer(MODEL, triton_inputs(pixels), headers=_bearer(FEEDBACK)),
                                  "PERMISSION_DENIED"),
        "infer token unloads": (lambda: client.unload_model(MODEL, headers=_bearer(INFER)), "PERMISSION_DENIED"),
        "no token reads metadata": (lambda: client.get_model_metadata(MODEL), "UNAUTHENTICATED"),
    }
    for case, (call, code) in refusals.items():
        with pytest.raises(InferenceServerException) as refused:
            call()
        assert _code(refused.value) == code, case
        assert INFER not in str(refused.value) and FEEDBACK not in str(refused.value), "no token is echoed"
    client.load_model(MODEL, headers=_bearer(ADMIN))  # the admin reloads the model
    assert client.is_model_ready(MODEL, headers=_bearer(ADMIN))
    # Labels need the feedback role, and come from the caller that was served.
    predicted = result.as_numpy("probabilities").argmax(axis=1)
    labels = [("tls-1", i, int(c)) for i, c in enumerate(predicted)]
    tls = _channel_credentials(certificates)
    with pytest.raises(grpc.RpcError) as denied:
        report(secured.url, labels, credentials=tls, token=INFER)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as foreign:
        report(secured.url, labels, credentials=tls, token=FEEDBACK)
    assert foreign.value.code() == grpc.StatusCode.NOT_FOUND
    client.infer(MODEL, triton_inputs(pixels), headers=_bearer(TEAM_A), request_id="tls-2")
    assert report(secured.url, [("tls-2", i, int(c)) for i, c in enumerate(predicted)], credentials=tls,
                  token=TEAM_A) == 4


def _channel_credentials(certificates: Certificates, client: bool = False) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        certificates.ca.read_bytes(),
        certificates.client_key.read_bytes() if client else None,
        certificates.client_cert.read_bytes() if client else None)


def test_health_needs_no_token_and_plaintext_clients_cannot_connect(secured: ThreadServer,
                                                                    certificates: Certificates) -> None:
    with grpc.secure_channel(secured.url, _channel_credentials(certificates)) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="liveness"),
                                                           timeout=5)
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(InferenceServerException) as refused:
        triton.InferenceServerClient(secured.url).is_server_live(headers=_bearer(INFER), client_timeout=5)
    assert _code(refused.value) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_aio_and_streaming_clients_send_their_token(secured: ThreadServer, certificates: Certificates,
                                                   reference: Reference) -> None:
    pixels = reference.images(2, seed=12)
    expected = reference(pixels)["probabilities"]

    async def aio_infer() -> np.ndarray:
        async with triton_aio.InferenceServerClient(secured.url, ssl=True,
                                                    root_certificates=str(certificates.ca)) as client:
            inputs = [triton_aio.InferInput("pixels", list(pixels.shape), "UINT8")]
            inputs[0].set_data_from_numpy(pixels)
            answer = await client.infer(MODEL, inputs, headers=_bearer(INFER))
            with pytest.raises(InferenceServerException) as refused:
                await client.infer(MODEL, inputs)
            assert _code(refused.value) == "UNAUTHENTICATED"
            return np.asarray(answer.as_numpy("probabilities"))

    np.testing.assert_allclose(asyncio.run(aio_infer()), expected, rtol=1e-5, atol=1e-6)

    for token, ok in ((INFER, True), (FEEDBACK, False)):
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client = _client(secured, certificates)
        client.start_stream(lambda result, error, into=results: into.put((result, error)), headers=_bearer(token))
        try:
            client.async_stream_infer(MODEL, triton_inputs(pixels))
        except InferenceServerException:  # the refusal already ended the stream: the callback has the error
            assert not ok
        result, error = results.get(timeout=30)
        client.stop_stream()
        if ok:
            assert error is None
            np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-5, atol=1e-6)
        else:
            assert result is None and "PERMISSION_DENIED" in str(error.status())


def test_mutual_tls_refuses_clients_without_a_certificate(repository: Path, certificates: Certificates,
                                                          tokens: Path) -> None:
    settings = thread_settings(repository, tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                               tls_client_ca=certificates.ca, tokens_file=tokens)
    with ThreadServer(settings) as server:
        with pytest.raises(InferenceServerException) as refused:
            _client(server, certificates).is_server_live(headers=_bearer(INFER), client_timeout=5)
        assert _code(refused.value) in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
        client = _client(server, certificates, private_key=str(certificates.client_key),
                         certificate_chain=str(certificates.client_cert))
        assert client.is_server_live(headers=_bearer(INFER))


def test_a_changed_tokens_file_is_read_again_and_a_broken_one_keeps_the_old_tokens(
        repository: Path, tokens: Path) -> None:
    with ThreadServer(thread_settings(repository, tokens_file=tokens)) as server:
        client = triton.InferenceServerClient(server.url)
        assert client.is_server_ready(headers=_bearer(INFER))
        rotated = "rotated-token-0123456789"
        tokens.write_text(f"{rotated} infer,feedback\n")
        time.sleep(RECHECK_S + 0.1)
        assert client.is_server_ready(headers=_bearer(rotated))
        with pytest.raises(InferenceServerException) as refused:
            client.is_server_ready(headers=_bearer(INFER))
        assert _code(refused.value) == "UNAUTHENTICATED"
        tokens.write_text("this line is not a token file\n")
        time.sleep(RECHECK_S + 0.1)
        assert client.is_server_ready(headers=_bearer(rotated)), "a broken file keeps the tokens read before"


def test_only_loopback_without_tokens_unless_insecure(tmp_path: Path, tokens: Path) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--repository", str(tmp_path), "--host", "0.0.0.0"])
    assert parse_settings(["--repository", str(tmp_path)]).host == "127.0.0.1"
    assert parse_settings(["--repository", str(tmp_path), "--host", "0.0.0.0", "--insecure"]).insecure
    assert parse_settings(["--repository", str(tmp_path), "--host", "0.0.0.0", "--tokens-file", str(tokens)])
    for flags in (["--tls-cert", str(tokens)], ["--tls-client-ca", str(tokens)],
                  ["--tls-cert", str(tokens), "--tls-key", str(tokens)],  # both exist, neither is PEM
                  ["--tokens-file", str(tmp_path / "missing")]):
        with pytest.raises(SystemExit):
            parse_settings(["--repository", str(tmp_path), *flags])


def test_a_caller_labels_only_what_it_was_served(repository: Path, tokens: Path, reference: Reference) -> None:
    with ThreadServer(thread_settings(repository, tokens_file=tokens)) as server:
        client = triton.InferenceServerClient(server.url)
        pixels = reference.images(2, seed=13)
        client.infer(MODEL, triton_inputs(pixels), request_id="a-only", headers=_bearer(TEAM_A))
        client.infer(MODEL, triton_inputs(pixels), request_id="same-id", headers=_bearer(TEAM_A))
        client.infer(MODEL, triton_inputs(pixels), request_id="same-id", headers=_bearer(TEAM_B))
        with pytest.raises(grpc.RpcError) as foreign:
            report(server.url, [("a-only", 0, 1)], token=TEAM_B)
        assert foreign.value.code() == grpc.StatusCode.NOT_FOUND, "B cannot label, nor learn of, A's predictions"
        # B's request with the same id did not replace A's: each labels its own.
        assert report(server.url, [("same-id", 0, 1), ("same-id", 1, 2)], token=TEAM_A) == 2
        assert report(server.url, [("same-id", 0, 1), ("same-id", 1, 2)], token=TEAM_B) == 2
        assert report(server.url, [("a-only", 0, 1)], token=TEAM_A) == 1



def test_the_health_port_answers_probes_in_plaintext_and_nothing_else(repository: Path, certificates: Certificates,
                                                                       tokens: Path) -> None:
    settings = thread_settings(repository, tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                               tokens_file=tokens, health_port=0)
    with ThreadServer(settings) as server:
        assert server.ports.health is not None
        for service in ("", "liveness"):
            assert health_status(server.ports.health, service) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(InferenceServerException) as refused:
            triton.InferenceServerClient(f"127.0.0.1:{server.ports.health}").infer(
                MODEL, triton_inputs(np.zeros((1, 1, 16, 16), np.uint8)), headers=_bearer(ADMIN))
        assert _code(refused.value) == "UNIMPLEMENTED"


def test_valley_reload_over_mutual_tls_with_an_admin_token(exported: Path, tmp_path: Path,
                                                           certificates: Certificates, tokens: Path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(exported, repository / MODEL / "1")
    settings = thread_settings(repository, tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                               tls_client_ca=certificates.ca, tokens_file=tokens)
    with ThreadServer(settings) as server:
        version = repository / MODEL / "2"
        shutil.copytree(repository / MODEL / "1", version)
        manifest = json.loads((version / "manifest.json").read_text())
        (version / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))

        def reload(token: str, *flags: str) -> tuple[int, list[dict[str, Any]]]:
            token_file = tmp_path / "token"
            token_file.write_text(token + "\n")
            result = subprocess.run(
                [sys.executable, "-m", "service.control.reload", "--target", f"localhost:{server.ports.grpc}",
                 "--model", MODEL, "--token-file", str(token_file), "--tls-ca", str(certificates.ca), *flags],
                cwd=REPO, capture_output=True, text=True, timeout=120)
            return result.returncode, [json.loads(line) for line in result.stdout.splitlines()]

        client_flags = ("--tls-client-cert", str(certificates.client_cert), "--tls-client-key",
                        str(certificates.client_key))
        code, lines = reload(INFER, *client_flags)
        assert code == 1 and "PERMISSION_DENIED" in lines[0]["error"]
        code, lines = reload(ADMIN)
        assert code == 1 and lines[0]["ok"] is False, "mutual TLS: no client certificate, no connection"
        code, lines = reload(ADMIN, *client_flags)
        assert code == 0 and lines[0]["version"] == "2", lines


def test_throwaway_credentials_run_a_server_as_production_does(repository: Path, tmp_path: Path,
                                                               reference: Reference) -> None:
    """What the examples and the demo use: a private CA's certificate and a token with every role."""
    credentials = throwaway_credentials(tmp_path / "pki")
    server = start_server_process(repository, *credentials.flags)
    try:
        client = triton.InferenceServerClient(f"localhost:{server.grpc_port}", ssl=True,
                                              root_certificates=str(credentials.ca))
        pixels = reference.images(2, seed=1)
        answer = client.infer(MODEL, triton_inputs(pixels), headers=credentials.headers)
        np.testing.assert_allclose(answer.as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)
        client.load_model(MODEL, headers=credentials.headers)  # the token has every role
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, triton_inputs(pixels))
        assert _code(refused.value) == "UNAUTHENTICATED"
    finally:
        stop_server_process(server)


def _https(server: ThreadServer, certificates: Certificates, method: str, path: str, token: str | None = None,
           body: bytes | None = None, client_cert: bool = False) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(certificates.ca))
    if client_cert:
        context.load_cert_chain(str(certificates.client_cert), str(certificates.client_key))
    assert server.ports.http is not None
    connection = http.client.HTTPSConnection("127.0.0.1", server.ports.http, context=context, timeout=30)
    try:
        connection.request(method, path, body, {"authorization": f"Bearer {token}"} if token else {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def test_the_http_port_speaks_tls_and_checks_the_same_tokens(secured: ThreadServer, certificates: Certificates,
                                                             reference: Reference) -> None:
    pixels = reference.images(3, seed=12)
    client = triton_http.InferenceServerClient(f"127.0.0.1:{secured.ports.http}", ssl=True,
                                               ssl_options={"ca_certs": str(certificates.ca)})
    result = client.infer(MODEL, http_inputs(pixels), headers=_bearer(INFER), request_id="https-1")
    np.testing.assert_allclose(result.as_numpy("probabilities"), reference(pixels)["probabilities"], atol=1e-6)
    assert client.get_model_metadata(MODEL, headers=_bearer(FEEDBACK))["name"] == MODEL, "any token reads metadata"
    # Probes carry no token: health answers everyone, as grpc.health.v1 does.
    assert _https(secured, certificates, "GET", "/v2/health/ready")[0] == 200
    assert _https(secured, certificates, "GET", "/v2/health/live")[0] == 200
    refusals = {
        "no token": ("POST", f"/v2/models/{MODEL}/infer", None, 401),
        "wrong token": ("POST", f"/v2/models/{MODEL}/infer", "x" * 22, 401),
        "no token reads metadata": ("GET", f"/v2/models/{MODEL}", None, 401),
        "feedback token infers": ("POST", f"/v2/models/{MODEL}/infer", FEEDBACK, 403),
        "infer token reads the repository": ("POST", "/v2/repository/index", INFER, 403),
        "infer token unloads": ("POST", f"/v2/repository/models/{MODEL}/unload", INFER, 403),
        "infer token reports labels": ("POST", "/valley/v1/feedback", INFER, 403),
        "infer token recalibrates": ("POST", f"/valley/v1/models/{MODEL}/recalibrate", INFER, 403),
    }
    for case, (method, path, token, status) in refusals.items():
        answered, headers, body = _https(secured, certificates, method, path, token, b"{}")
        assert answered == status, f"{case}: {answered} {body!r}"
        assert INFER not in body.decode() and FEEDBACK not in body.decode(), "no token is echoed"
        if status == 401:
            assert headers["www-authenticate"] == "Bearer", case
    assert client.is_model_ready(MODEL, headers=_bearer(INFER))
    status, _, body = _https(secured, certificates, "POST", "/v2/repository/index", ADMIN)
    assert status == 200 and json.loads(body)[0]["state"] == "READY"
    # The labels a token reports over HTTP join what that token was served, over either transport.
    labels = json.dumps({"labels": [{"model_name": MODEL, "request_id": "https-1", "position": 0,
                                     "true_class": 1}]}).encode()
    assert _https(secured, certificates, "POST", "/valley/v1/feedback", FEEDBACK, labels)[0] == 404
    assert _https(secured, certificates, "POST", "/valley/v1/feedback", INFER, labels)[0] == 403
    triton_http.InferenceServerClient(f"127.0.0.1:{secured.ports.http}", ssl=True, ssl_options={
        "ca_certs": str(certificates.ca)}).infer(MODEL, http_inputs(pixels), headers=_bearer(TEAM_A),
                                                  request_id="https-2")
    team_labels = labels.replace(b"https-1", b"https-2")
    status, _, body = _https(secured, certificates, "POST", "/valley/v1/feedback", TEAM_A, team_labels)
    assert (status, json.loads(body)) == (200, {"accepted": 1})
    with pytest.raises((ConnectionError, http.client.HTTPException)):  # plaintext HTTP to the TLS port
        connection = http.client.HTTPConnection("127.0.0.1", secured.ports.http, timeout=10)
        connection.request("GET", "/v2/health/ready")
        connection.getresponse()


def test_mutual_tls_on_the_http_port(repository: Path, certificates: Certificates, tokens: Path) -> None:
    settings = thread_settings(repository, tls_cert=certificates.server_cert, tls_key=certificates.server_key,
                               tls_client_ca=certificates.ca, tokens_file=tokens)
    with ThreadServer(settings) as server:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _https(server, certificates, "GET", "/v2/health/live")
        assert _https(server, certificates, "GET", "/v2/health/live", client_cert=True)[0] == 200
