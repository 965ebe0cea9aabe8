"""The Open Inference Protocol v2 over HTTP/REST, answered by the same data plane as gRPC.

Routes are Triton's and KServe's (`{model}` may be followed by `/versions/{version}`):

    GET  /v2/health/live, /v2/health/ready          open to every caller, as grpc.health.v1 is
    GET  /v2                                          server metadata
    GET  /v2/models/{model}                           model metadata
    GET  /v2/models/{model}/ready                     200 when it serves; 404 unknown, 503 not ready
    GET  /v2/models/{model}/config                    Triton's ModelConfig as JSON
    POST /v2/models/{model}/infer                     JSON tensors, or Triton's binary data
    GET  /v2/models/stats, /v2/models/{model}/stats  statistics
    POST /v2/repository/index                         the repository extension (admin)
    POST /v2/repository/models/{name}/load | unload
    POST /valley/v1/feedback                          labels for served predictions (valley.v1.Feedback)
    GET  /valley/v1/models/{model}/calibration        the temperature live labels suggest (admin)
    POST /valley/v1/models/{model}/recalibrate        publish a version at it (admin)

Every route but health goes through one guard: the shared concurrency limit, the bearer token
(`Authorization: Bearer ...`, the role of the gRPC method of the same name), and the error
table of `service.errors`, each code answered with its HTTP status and `{"error": message}`, the
body Triton's clients read. Request bodies are read up to --max-message-bytes (413 beyond,
after decompressing a gzip or deflate body), and answers are compressed when the client accepts
it, as Triton does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gzip
import inspect
import logging
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.control.control import Control
from service.control.recalibrate import Suggestion
from service.core.inference import Inference, InferenceRequest, ModelMetadata, NamedStatistics
from service.core.request import BINARY_OUTPUT
from service.core.statistics import Duration
from service.errors import HTTP_STATUS, InvalidInput, Status, answer_of, shown
from service.feedback import MAX_LABELS, Label
from service.settings import Settings
from service.transport import jsoncodec
from service.transport.concurrency import UNLIMITED, ConcurrencyLimit
from service.transport.security import CALLER, OPEN, Authorizer

log = logging.getLogger(__name__)

JSON = "application/json"
BINARY = "application/octet-stream"
COMPRESS_FROM_BYTES = 1024
"""Answers shorter than this go uncompressed whatever the client accepts (compressing them gains nothing)."""
BODY_TIMEOUT_S = 120.0
"""Longest a request body may take to arrive (64 MiB at 0.5 MiB/s): a client that trickles it holds a place of the
concurrency limit no longer than this."""
_Answer = Response | Awaitable[Response]


class TooLarge(Exception):
    """A request body beyond --max-message-bytes: 413."""


class TooSlow(Exception):
    """A request body that did not arrive within BODY_TIMEOUT_S: 408."""


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY), status, headers, media_type=JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return _json({"error": message}, status, headers)


def _answer_error(status: Status) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if status.code == "UNAUTHENTICATED" else None
    return _error(HTTP_STATUS.get(status.code, 500), status.message, headers)


# -- bodies ---------------------------------------------------------------------------------


async def _body(request: Request, limit: int) -> bytes:
    """The request body, decompressed, of at most `limit` bytes before and after decompression."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"the request body has {declared} bytes; this server takes at most {limit} "
                       "(--max-message-bytes): split the request")

    async def read() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"the request body has more than {limit} bytes; this server takes at most {limit} "
                               "(--max-message-bytes): split the request")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        body = await asyncio.wait_for(read(), BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise TooSlow(f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding[:40]!r} is not supported; send gzip, deflate or identity")
    # gzip: the gzip wrapper; deflate: the zlib wrapper (what HTTP calls deflate, and what tritonclient sends).
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise InvalidInput(f"the {encoding} request body does not decompress ({error})") from None
    if len(plain) > limit or inflater.unconsumed_tail:
        raise TooLarge(f"the request body decompresses to more than {limit} bytes; this server takes at most "
                       f"{limit} (--max-message-bytes): split the request")
    if not inflater.eof:
        raise InvalidInput(f"the {encoding} request body is cut short")
    return plain


async def _json_body(request: Request, limit: int) -> dict[str, Any]:
    """A small JSON object body; an empty body is an empty object."""
    body = await _body(request, limit)
    return jsoncodec.json_object(body) if body.strip() else {}


def _compressed(body: bytes, accepted: str) -> tuple[bytes, str | None]:
    """`body` in the first encoding the client accepts of gzip and deflate (None: as it is)."""
    if len(body) < COMPRESS_FROM_BYTES:
        return body, None
    offered = {part.split(";")[0].strip().lower() for part in accepted.split(",")}
    if "gzip" in offered:
        return gzip.compress(body, compresslevel=6), "gzip"
    if "deflate" in offered:
        return zlib.compress(body), "deflate"
    return body, None


# -- JSON forms of the data plane's answers -------------------------------------------------


def _metadata(metadata: ModelMetadata) -> dict[str, Any]:
    def tensor(spec: Any) -> dict[str, Any]:
        return {"name": spec.name, "datatype": spec.datatype, "shape": spec.shape}

    return {"name": metadata.name, "versions": metadata.versions, "platform": metadata.platform,
            "inputs": [tensor(spec) for spec in metadata.inputs],
            "outputs": [tensor(spec) for spec in metadata.outputs], "parameters": metadata.parameters}


def _duration(duration: Duration) -> dict[str, int]:
    return {"count": duration.count, "ns": duration.ns}


def _statistics(named: NamedStatistics) -> dict[str, Any]:
    stats, none = named.statistics, {"count": 0, "ns": 0}
    return {"name": named.name, "version": named.version, "last_inference": stats.last_inference_ms,
            "inference_count": stats.inference_count, "execution_count": stats.execution_count,
            "inference_stats": {"success": _duration(stats.success), "fail": _duration(stats.fail),
                                "queue": _duration(stats.queue), "compute_input": none,
                                "compute_infer": _duration(stats.compute), "compute_output": none,
                                "cache_hit": none, "cache_miss": none},
            "batch_stats": [{"batch_size": size, "compute_input": none, "compute_infer": _duration(runs),
                             "compute_output": none} for size, runs in sorted(stats.batches.items())]}


def _suggestion(name: str, version: int, suggestion: Suggestion) -> dict[str, Any]:
    return {"model_name": name, "model_version": str(version), "labels": suggestion.labels,
            "temperature": suggestion.temperature, "suggested_temperature": suggestion.suggested,
            "current": suggestion.current_metrics, "suggested": suggestion.suggested_metrics}


# -- the application --------------------------------------------------------------------------


class Frontend:
    """The FastAPI application serving the protocol over HTTP from the data plane's two halves."""

    def __init__(self, inference: Inference, control: Control, authorizer: Authorizer = OPEN,
                 limit: ConcurrencyLimit = UNLIMITED, max_body_bytes: int = 64 << 20) -> None:
        self.inference, self.control = inference, control
        self.authorizer, self.limit, self.max_body_bytes = authorizer, limit, max_body_bytes
        app = FastAPI(title="valley", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_exception_handler(StarletteHTTPException, self._route_error)  # type: ignore[arg-type]
        # HEAD too: load balancers that check health without a body.
        app.add_api_route("/v2/health/live", self.live, methods=["GET", "HEAD"])
        app.add_api_route("/v2/health/ready", self.ready, methods=["GET", "HEAD"])
        app.add_api_route("/v2", self.server_metadata, methods=["GET"])
        app.add_api_route("/v2/models/stats", self.statistics, methods=["GET"])
        app.add_api_route("/v2/repository/index", self.index, methods=["POST"])
        app.add_api_route("/v2/repository/models/{name}/load", self.load, methods=["POST"])
        app.add_api_route("/v2/repository/models/{name}/unload", self.unload, methods=["POST"])
        app.add_api_route("/valley/v1/feedback", self.feedback, methods=["POST"])
        for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            app.add_api_route(model, self.model_metadata, methods=["GET"])
            app.add_api_route(f"{model}/ready", self.model_ready, methods=["GET"])
            app.add_api_route(f"{model}/config", self.model_config, methods=["GET"])
            app.add_api_route(f"{model}/stats", self.statistics, methods=["GET"])
            app.add_api_route(f"{model}/infer", self.infer, methods=["POST"])
        for model in ("/valley/v1/models/{name}", "/valley/v1/models/{name}/versions/{version}"):
            app.add_api_route(f"{model}/calibration", self.calibration, methods=["GET"])
            app.add_api_route(f"{model}/recalibrate", self.recalibrate, methods=["POST"])
        self.app = app

    async def _route_error(self, request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 404:
            return _error(404, f"no endpoint {request.method} {request.url.path[:200]}: the protocol's endpoints "
                               "start with /v2 (health, models, repository)")
        if error.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path[:200]}",
                          dict(error.headers or {}))
        return _error(error.status_code, str(error.detail)[:400])

    async def _guard(self, request: Request, method: str, answer: Callable[[], _Answer]) -> Response:
        """`answer()` for an authorized caller within the concurrency limit; every exception answered through the
        error table (INTERNAL, logged, for what is not ours)."""
        try:
            with self.limit.held():
                CALLER.set(self.authorizer.check(method, tuple(request.headers.items())))
                result = answer()
                return await result if inspect.isawaitable(result) else result
        except TooLarge as error:
            return _error(413, str(error))
        except TooSlow as error:
            return _error(408, str(error))
        except Exception as error:
            status = answer_of(error)
        return _answer_error(status)

    @staticmethod
    def _model(request: Request) -> tuple[str, str]:
        return request.path_params["name"], request.path_params.get("version", "")

    # -- health and metadata --------------------------------------------------------------

    async def live(self) -> Response:
        return _json({"live": self.inference.live()})

    async def ready(self) -> Response:
        ready = self.inference.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        def answer() -> Response:
            metadata = self.inference.server_metadata()
            return _json({"name": metadata.name, "version": metadata.version,
                          "extensions": list(metadata.extensions)})

        return await self._guard(request, "ServerMetadata", answer)

    async def model_metadata(self, request: Request) -> Response:
        return await self._guard(request, "ModelMetadata",
                                 lambda: _json(_metadata(self.inference.model_metadata(*self._model(request)))))

    async def model_ready(self, request: Request) -> Response:
        def answer() -> Response:
            name, version = self._model(request)
            self.inference.check_ready(name, version)
            return _json({"name": name, "version": version, "ready": True})

        return await self._guard(request, "ModelReady", answer)

    async def model_config(self, request: Request) -> Response:
        return await self._guard(request, "ModelConfig",
                                 lambda: _json(self.inference.model_config(*self._model(request))))

    async def statistics(self, request: Request) -> Response:
        def answer() -> Response:
            name, version = request.path_params.get("name", ""), request.path_params.get("version", "")
            return _json({"model_stats": [_statistics(named) for named in self.inference.statistics(name, version)]})

        return await self._guard(request, "ModelStatistics", answer)

    # -- inference ------------------------------------------------------------------------

    async def infer(self, request: Request) -> Response:
        return await self._guard(request, "ModelInfer", lambda: self._infer(request))

    async def _infer(self, request: Request) -> Response:
        name, version = self._model(request)
        body = await _body(request, self.max_body_bytes)
        header_length = request.headers.get(jsoncodec.HEADER_LENGTH)
        json_bytes = len(body) if header_length is None or not header_length.isdigit() else int(header_length)
        heavy = json_bytes > jsoncodec.JSON_ON_LOOP
        parsed = await asyncio.to_thread(jsoncodec.parse_body, body, header_length) if heavy else \
            jsoncodec.parse_body(body, header_length)
        header = parsed.header
        request_id = jsoncodec.text(header.get("id", ""), "id")
        parameters = jsoncodec.parameters(header, "the request")
        answer = await self.inference.infer(InferenceRequest.framed(
            name, version, request_id, lambda: jsoncodec.frame(parsed), parameters=parameters,
            caller=CALLER.get().principal, heavy=heavy))
        # The data plane checked the parameters: binary_data_output is a boolean where it is given.
        binary_default = bool(parameters.get(BINARY_OUTPUT, False))
        encode = functools.partial(jsoncodec.encode, answer.model, answer.version, answer.id, answer.outputs,
                                   answer.parameters, jsoncodec.binary_outputs(header, binary_default))
        large = sum(array.size for array in answer.outputs.values()) > jsoncodec.VALUES_ON_LOOP
        content, length = await asyncio.to_thread(encode) if large else encode()
        headers: dict[str, str] = {}
        if length is not None:
            headers["Inference-Header-Content-Length"] = str(length)
        content, encoding = _compressed(content, request.headers.get("accept-encoding", ""))
        if encoding is not None:
            headers["Content-Encoding"] = encoding
        return Response(content, 200, headers, media_type=BINARY if length is not None else JSON)

    # -- repository, feedback, calibration -----------------------------------------------

    async def index(self, request: Request) -> Response:
        async def answer() -> Response:
            ready = (await _json_body(request, self.max_body_bytes)).get("ready", False)
            if not isinstance(ready, bool):
                raise InvalidInput(f"'ready' must be true or false, got {ready!r}")
            return _json([{"name": e.name, "version": e.version, "state": e.state.value, "reason": shown(e.reason)}
                          for e in await self.control.index(ready_only=ready)])

        return await self._guard(request, "RepositoryIndex", answer)

    async def load(self, request: Request) -> Response:
        async def answer() -> Response:
            parameters = jsoncodec.parameters(await _json_body(request, self.max_body_bytes), "the load request")
            config = parameters.get("config")
            if config is not None and not isinstance(config, str):
                raise InvalidInput("the load parameter 'config' must be a string holding the model config as JSON")
            await self.control.load(request.path_params["name"], config, [key for key in parameters
                                                                            if key != "config"])
            return _json({})

        return await self._guard(request, "RepositoryModelLoad", answer)

    async def unload(self, request: Request) -> Response:
        async def answer() -> Response:
            # unload_dependents, Triton's one unload parameter, changes nothing: an ensemble here has no dependents.
            jsoncodec.parameters(await _json_body(request, self.max_body_bytes), "the unload request")
            await self.control.unload(request.path_params["name"])
            return _json({})

        return await self._guard(request, "RepositoryModelUnload", answer)

    async def feedback(self, request: Request) -> Response:
        async def answer() -> Response:
            labels = (await _json_body(request, self.max_body_bytes)).get("labels")
            if not isinstance(labels, list):
                raise InvalidInput("the body needs 'labels': a list of {model_name, request_id, position, true_class}")
            # One past the limit is enough for the data plane to refuse an oversized report.
            accepted = await self.control.report([_label(label, index) for index, label in
                                                    enumerate(labels[:MAX_LABELS + 1])], CALLER.get().principal)
            return _json({"accepted": accepted})

        return await self._guard(request, "Report", answer)

    async def calibration(self, request: Request) -> Response:
        async def answer() -> Response:
            model, suggestion, _ = await asyncio.to_thread(self.control.suggestion, *self._model(request))
            return _json(_suggestion(model.name, model.version, suggestion))

        return await self._guard(request, "Suggest", answer)

    async def recalibrate(self, request: Request) -> Response:
        async def answer() -> Response:
            temperature = (await _json_body(request, self.max_body_bytes)).get("temperature", 0.0)
            if isinstance(temperature, bool) or not isinstance(temperature, int | float):
                raise InvalidInput(f"'temperature' must be a number (0: the suggested one), got {temperature!r}")
            name, version = self._model(request)
            parent, new, suggestion, applied = await self.control.recalibrate(name, version, float(temperature),
                                                                                CALLER.get().principal)
            return _json({"model_name": name, "published_version": str(new), "temperature": applied,
                          "suggestion": _suggestion(name, parent, suggestion)})

        return await self._guard(request, "Recalibrate", answer)


def _label(value: object, index: int) -> Label:
    if not isinstance(value, dict):
        raise InvalidInput(f"label {index} must be an object with model_name, request_id, position and true_class")
    model, request_id = value.get("model_name", ""), value.get("request_id", "")
    position, true_class = value.get("position", 0), value.get("true_class", 0)
    if not isinstance(model, str) or not isinstance(request_id, str):
        raise InvalidInput(f"label {index}: model_name and request_id must be strings")
    for what, number in (("position", position), ("true_class", true_class)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 1 << 32:
            raise InvalidInput(f"label {index}: {what} must be a non-negative integer, got {number!r}")
    return Label(model, request_id, position, true_class)


# -- uvicorn inside the server's event loop -------------------------------------------------


class _Embedded(uvicorn.Server):
    """uvicorn on the loop that serves gRPC too: the process's signal handlers stay the server's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on host:port. Made with IPPROTO_TCP, which asyncio looks for before it turns Nagle's
    algorithm off on each connection: without it, an answer's headers and body leave in two writes, the second held
    for the client's delayed ACK (40 ms on Linux)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as every server: restart over TIME_WAIT
        sock.bind((address, port))
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen for HTTP on {host}:{port}: the port is in use or the address is wrong "
                      f"({error.strerror})") from error
    return sock


class HttpServer:
    """The HTTP port: `Frontend`'s application under uvicorn, with the gRPC port's TLS."""

    def __init__(self, frontend: Frontend, settings: Settings) -> None:
        self.settings = settings
        tls: dict[str, Any] = {}
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
            if settings.tls_client_ca is not None:
                tls.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
        # uvicorn logs a line per start and stop of its own; the server's log says what matters.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        config = uvicorn.Config(frontend.app, log_config=None, access_log=False, lifespan="off",
                                server_header=False, timeout_graceful_shutdown=1, **tls)
        self._server = _Embedded(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen on the settings' host and HTTP port; the port bound."""
        sock = _listening_socket(self.settings.host, self.settings.http_port)
        port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="valley-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises why it stopped
                raise OSError(f"the HTTP server on port {port} stopped as it started")
            await asyncio.sleep(0.01)
        return port

    async def stop(self, timeout: float) -> None:
        """Close the port and the connections, within `timeout` seconds."""
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except asyncio.TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            log.warning("HTTP connections still open when the grace period ended; closed")
