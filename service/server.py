"""The composition root: settings -> observer -> repository -> data plane -> gRPC and metrics servers.

The gRPC server starts before the ensembles load, so liveness (grpc.health.v1 service
"liveness") answers SERVING at once while readiness ("", inference.GRPCInferenceService and
ServerReady) stays NOT_SERVING until every ensemble is verified.

Once the loads are done, `serve` prints one JSON line with the ports bound (and writes it to
`ready_file`), so a caller that asked for port 0 learns them without racing. On SIGTERM or
SIGINT readiness goes NOT_SERVING, new requests are refused, in-flight ones finish (up to
`shutdown_grace_s`), queued batches drain, then `serve` returns.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from service._proto import POOL
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.valley.v1 import calibration_pb2 as calibration_pb
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service.control.control import Control
from service.control.repository import Repository
from service.core.inference import Inference
from service.core.observer import NULL_OBSERVER, Observer
from service.feedback import Feedback, open_store
from service.observe.metrics import FeedbackStoreCollector, ServingMetrics
from service.settings import Settings
from service.transport.concurrency import ConcurrencyLimit
from service.transport.rest import Frontend, HttpServer
from service.transport.security import Authorizer, Tokens, server_credentials
from service.transport.servicer import CalibrationServicer, FeedbackServicer, InferenceServicer, add_servicer

log = logging.getLogger(__name__)

INFERENCE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
FEEDBACK = feedback_pb.DESCRIPTOR.services_by_name["Feedback"]
CALIBRATION = calibration_pb.DESCRIPTOR.services_by_name["Calibration"]
INFERENCE_SERVICE = INFERENCE.full_name
# grpc's own services, served through the same guard as ours (open to all): a body that does not parse is
# INVALID_ARGUMENT there too, never grpc's UNKNOWN.
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
LIVENESS_SERVICE = "liveness"
"""The grpc.health.v1 service name of liveness; "" and inference.GRPCInferenceService are readiness."""
WATCH_GRACE_S = 0.5
"""After every RPC of ours has finished, how long grpc may still flush answers before it cuts what remains."""
EXIT_RESERVE_S = 1.5
"""The end of the shutdown grace period kept for the process's exit after the server has stopped."""
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Ports:
    grpc: int
    metrics: int
    health: int | None = None
    http: int | None = None


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection over our private descriptor pool, with the health and reflection services added to it."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    names = [INFERENCE_SERVICE, FEEDBACK.full_name, CALIBRATION.full_name, HEALTH.full_name, REFLECTION.full_name]
    add_servicer(server, reflection.aio.ReflectionServicer(names, pool=POOL), REFLECTION)


class Server:
    """A running valley server; `start`, then `wait`, then `stop` (what `serve` does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.health = HealthServicer()
        # The gauges read the data plane at scrape time, once it exists.
        self.observer: Observer = ServingMetrics(self.registry, lambda: self.inference.queue_depths(),
                                                 lambda: self.inference.in_flight(),
                                                 lambda: self.control.suggestions()) \
            if settings.metrics else NULL_OBSERVER
        self.repository = Repository(settings, self.observer, on_state=self._model_state)
        self.store = open_store(settings.feedback_store, ttl_seconds=settings.feedback_ttl_s,
                                max_predictions=settings.feedback_max_predictions,
                                max_bytes=settings.feedback_max_bytes, replica=settings.replica,
                                state_dir=settings.state_dir, flush_interval=settings.feedback_flush_ms / 1000,
                                queue_items=settings.feedback_queue, queue_bytes=settings.feedback_queue_bytes) \
            if settings.feedback_on else None
        feedback = Feedback(self.store, settings.calibration_window, self.observer, settings.replica,
                            self.repository.calibration_window)
        if settings.metrics and self.store is not None:
            self.registry.register(FeedbackStoreCollector(self.store))
        self.feedback = feedback
        self.inference = Inference(self.repository, self.observer, feedback)
        self.control = Control(self.repository, self.inference, feedback, settings.model_control_mode,
                               settings.recalibration_min_labels)
        limit = settings.max_message_bytes
        # so_reuseport 0: a second server on a taken port must fail, not silently share it.
        self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit),
                                             ("grpc.max_send_message_length", limit)])
        # Health and reflection stay open (probes carry no token); every other RPC is authorized.
        authorizer = Authorizer(Tokens(settings.tokens_file) if settings.tokens_file else None)
        self.concurrency = ConcurrencyLimit(settings.max_concurrent_rpcs, self.observer)
        self.servicer = InferenceServicer(self.inference, self.control)
        add_servicer(self.grpc, self.servicer, INFERENCE, authorizer, self.concurrency)
        add_servicer(self.grpc, FeedbackServicer(self.control), FEEDBACK, authorizer, self.concurrency)
        add_servicer(self.grpc, CalibrationServicer(self.control), CALIBRATION, authorizer, self.concurrency)
        add_servicer(self.grpc, self.health, HEALTH)
        _enable_reflection(self.grpc)
        frontend = Frontend(self.inference, self.control, authorizer, self.concurrency, settings.max_message_bytes)
        self.http = HttpServer(frontend, settings) if settings.http else None
        # Probes that cannot do TLS get the same health service in plaintext, and nothing else, on a port of its own.
        self.health_grpc: grpc.aio.Server | None = None
        if settings.health_port is not None:
            self.health_grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            add_servicer(self.health_grpc, self.health, HEALTH)
        self._stopping = asyncio.Event()
        self._seeding: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._metrics_http: WSGIServer | None = None

    async def _model_state(self, name: str, serving: bool) -> None:
        await self.health.set(name, SERVING if serving else NOT_SERVING)
        await self._server_state()
        if serving and self.feedback.shared:
            for version in self.repository.versions(name):
                task = asyncio.create_task(self._seed(name, version), name=f"valley-seed-{name}-{version}")
                self._seeding.add(task)
                task.add_done_callback(self._seeding.discard)

    async def _seed(self, name: str, version: int) -> None:
        """Start a version's calibration window from the fleet's labels in the store (a restart is not blind)."""
        try:
            await asyncio.to_thread(self.feedback.seed, name, version)
        except Exception as error:  # the store is down: the window fills from the labels this replica receives
            log.warning("the calibration window of %s version %d starts empty: %s", name, version, error)

    async def _server_state(self) -> None:
        ready = self.inference.ready()
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, SERVING if ready else NOT_SERVING)

    async def start(self) -> Ports:
        settings = self.settings
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, NOT_SERVING)
        # Liveness answers as soon as the port is open, while ensembles load: a liveness probe must not
        # restart a server that is busy loading a large repository. Readiness ("") waits for them.
        await self.health.set(LIVENESS_SERVICE, SERVING)
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            if settings.tls_cert is not None and settings.tls_key is not None:
                credentials = server_credentials(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
                grpc_port = self.grpc.add_secure_port(address, credentials)
            else:
                grpc_port = self.grpc.add_insecure_port(address)
        except RuntimeError as error:  # grpc's way of saying the bind failed
            tls = ", or the TLS certificate and key do not match" if settings.tls_cert else ""
            raise OSError(f"cannot listen for gRPC on {address}: the port is in use or the address is wrong{tls}") \
                from error
        if self.store is not None:
            self.store.start()
            log.info("feedback store: %s (%s)", self.store.kind, self.store.location)
        metrics_http, _ = start_http_server(settings.metrics_port, settings.host, self.registry)
        self._metrics_http = metrics_http
        metrics_port = int(metrics_http.server_port)
        health_port = None
        if self.health_grpc is not None:
            health_address = f"{settings.host}:{settings.health_port}"
            try:
                health_port = self.health_grpc.add_insecure_port(health_address)
            except RuntimeError as error:
                raise OSError(f"cannot listen for health checks on {health_address}: the port is in use or the "
                              "address is wrong") from error
            await self.health_grpc.start()
        http_port = await self.http.start() if self.http is not None else None
        await self.grpc.start()
        transport = ("mutual TLS" if settings.tls_client_ca else "TLS") if settings.tls_cert else "plaintext"
        access = "bearer tokens" if settings.tokens_file else "no authentication"
        health = f", plaintext health checks on port {health_port}" if health_port is not None else ""
        http = f", HTTP/REST on port {http_port}" if http_port is not None else ""
        log.info("gRPC (%s, %s) on %s:%d%s, metrics on http://%s:%d/metrics%s; loading ensembles from %s", transport,
                 access, settings.host, grpc_port, http, settings.host, metrics_port, health, settings.repository)
        await asyncio.to_thread(self.repository.tidy)
        await self.repository.load_all(settings.startup_models, stopping=self._stopping.is_set)
        # What exists now (modules, loaded ensembles) lives as long as the server: moved out of the collector's sight
        # (after a last collection, so no garbage is kept), a full collection scans only what requests made, and
        # stops the event loop for about a millisecond instead of 25-30 ms (measured under HTTP load, where they
        # held 1-2 % of the requests 40 ms). `stop` hands them back.
        gc.collect()
        gc.freeze()
        if self._stopping.is_set():
            return Ports(grpc_port, metrics_port, health_port, http_port)
        if settings.model_control_mode == "poll":
            self._poller = asyncio.create_task(self._poll(settings.repository_poll_s), name="valley-repository-poll")
        await self._server_state()
        ready = ", ".join(f"{m.name} v{m.version} ({m.ensemble.providers[0]})" for m in self.repository.served())
        log.info("ready: %s", ready or "no ensembles")
        return Ports(grpc_port, metrics_port, health_port, http_port)

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.repository.poll()
            except Exception:  # a repository that cannot be read now (a network volume) may be readable next time
                log.exception("polling the model repository failed")

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """A stop was asked for (SIGTERM or SIGINT)."""
        return self._stopping.is_set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Refuse new work, let in-flight requests finish, drain the batchers, close the ports."""
        log.info("shutting down: readiness NOT_SERVING, finishing in-flight requests (grace %.0f s)",
                 self.settings.shutdown_grace_s)
        self.inference.shutting_down = True
        if self._poller is not None:
            self._poller.cancel()
        await self._server_state()
        await self.health.enter_graceful_shutdown()
        grace = self.settings.shutdown_grace_s
        # The grace period is the whole time to exit: the process's own exit (threads, libraries) gets the end of it.
        ends = time.monotonic() + grace - min(EXIT_RESERVE_S, grace / 3)
        # Streams read nothing more: each ends UNAVAILABLE once the answers it owes are written. While in-flight
        # requests finish, the port stays open: new requests get a clear UNAVAILABLE from the servicer rather
        # than a connection torn down under them.
        self.servicer.end_streams()
        try:
            await asyncio.wait_for(self.inference.drained(), max(0.0, ends - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("requests still in flight when the grace period ended")
        # The port stays open until the other RPCs (a load in progress) are done: meanwhile new requests get a
        # clear UNAVAILABLE, where grpc's own shutdown would answer them CANCELLED.
        while self.concurrency.active and time.monotonic() < ends:
            await asyncio.sleep(0.02)
        # What is left are health watches, which never end by themselves: a moment for answers just given to go
        # out, then they are cut.
        await self.grpc.stop(min(WATCH_GRACE_S, max(0.0, ends - time.monotonic())))
        if self.http is not None:  # every HTTP request of ours has finished too: close its port and connections
            await self.http.stop(min(WATCH_GRACE_S, max(0.0, ends - time.monotonic())) + 0.5)
        try:  # queued batches of unloaded models drain within what is left of the grace period
            await asyncio.wait_for(self.repository.close(), max(0.0, ends - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("the grace period ended before every queued batch finished; exiting anyway")
        if self.store is not None:  # every answer is given: what waits for the feedback store is written now
            await asyncio.to_thread(self.store.close, max(1.0, ends - time.monotonic()))
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        gc.unfreeze()  # a process that goes on (tests, an embedding program) can collect the server's objects
        log.info("stopped")

    def announce(self, ports: Ports) -> None:
        """Print the ports bound and the readiness as one JSON line, and write it to `ready_file` if set."""
        line = json.dumps({"grpc_port": ports.grpc, "http_port": ports.http, "metrics_port": ports.metrics,
                           "health_port": ports.health,
                           "host": self.settings.host, "ready": self.inference.ready(), "pid": os.getpid()})
        print(line, flush=True)
        path = self.settings.ready_file
        if path is not None:  # written aside and renamed: a reader never sees half a line
            temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temporary.write_text(line + "\n")
            os.replace(temporary, path)


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (within the grace period, even while loading)."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(server.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            ports = starting.result()  # a bind failure raises here
            if not server.stopping:
                server.announce(ports)
            await stopping
        await server.stop()  # a signal during the loads does not wait for them
    finally:
        starting.cancel()
        stopping.cancel()
        if settings.ready_file is not None:
            settings.ready_file.unlink(missing_ok=True)
