"""The composition root: settings -> repository -> gRPC and metrics servers, and the shutdown.

The gRPC server starts before the ensembles load, so liveness answers at once while
readiness (ServerReady, grpc.health.v1) stays NOT_SERVING until every ensemble is verified.
On SIGTERM or SIGINT readiness goes NOT_SERVING, new requests are refused, in-flight ones
finish (up to `shutdown_grace_s`), queued batches drain, then `serve` returns.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, start_http_server

from service._proto import POOL
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service._proto.valley.v1 import feedback_pb2_grpc as feedback_grpc
from service.batching import BatchRecord
from service.feedback import PredictionStore
from service.metrics import ServingMetrics
from service.repository import Repository, ServedModel
from service.servicer import FeedbackServicer, InferenceServicer
from service.settings import Settings

log = logging.getLogger(__name__)

INFERENCE_SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
FEEDBACK_SERVICE = feedback_pb.DESCRIPTOR.services_by_name["Feedback"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Ports:
    grpc: int
    metrics: int


def _enable_reflection(server: grpc.aio.Server) -> None:
    """Server reflection over our private descriptor pool, with the health and reflection services added to it."""
    for module in (health_pb2, reflection_pb2):
        try:
            POOL.FindFileByName(module.DESCRIPTOR.name)
        except KeyError:
            POOL.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    names = [INFERENCE_SERVICE, FEEDBACK_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server, pool=POOL)


class Server:
    """A running valley server; `start`, then `wait`, then `stop` (what `serve` does)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()
        for collector in (ProcessCollector, PlatformCollector, GCCollector):
            collector(registry=self.registry)
        self.health = HealthServicer()
        self.metrics = ServingMetrics(self.registry, self._queue_depths) if settings.metrics else None
        self.repository = Repository(settings, on_state=self._model_state,
                                     on_batch=self._batch_done if settings.metrics else None)
        predictions = PredictionStore(settings.feedback_max_predictions, settings.feedback_ttl_s) \
            if settings.metrics else None
        self.servicer = InferenceServicer(self.repository, settings.max_batch_size, self.metrics, predictions)
        self.feedback = FeedbackServicer(predictions, self.metrics, settings.calibration_window)
        limit = settings.max_message_bytes
        # so_reuseport 0: a second server on a taken port must fail, not silently share it.
        self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", limit),
                                             ("grpc.max_send_message_length", limit)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.grpc)  # type: ignore[no-untyped-call]
        feedback_grpc.add_FeedbackServicer_to_server(self.feedback, self.grpc)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        _enable_reflection(self.grpc)
        self._stopping = asyncio.Event()

    async def _model_state(self, name: str, current: ServedModel | None, previous: ServedModel | None) -> None:
        if self.metrics is not None:
            if previous is not None:
                self.metrics.observe_unload(previous.name, previous.version)
            if current is not None:
                self.metrics.observe_load(current.ensemble)
                for instance in current.instances:
                    instance.on_member_times = self.metrics.member_timer(current.name, current.version)
        await self.health.set(name, SERVING if current is not None else NOT_SERVING)
        await self._server_state()

    def _batch_done(self, served: ServedModel, record: BatchRecord) -> None:
        assert self.metrics is not None  # only wired when metrics are on
        self.metrics.observe_batch(served.name, served.version, served.ensemble.manifest.classes, record)

    def _queue_depths(self) -> list[tuple[str, str, int]]:
        return [(m.name, str(m.version), m.batcher.depth) for m in self.repository.served()]

    async def _server_state(self) -> None:
        ready = self.repository.ready and not self.servicer.shutting_down
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, SERVING if ready else NOT_SERVING)

    async def start(self) -> Ports:
        settings = self.settings
        for service in ("", INFERENCE_SERVICE):
            await self.health.set(service, NOT_SERVING)
        address = f"{settings.host}:{settings.grpc_port}"
        try:
            grpc_port = self.grpc.add_insecure_port(address)
        except RuntimeError as error:  # grpc's way of saying the bind failed
            raise OSError(f"cannot listen for gRPC on {address}: the port is in use or the address is wrong") \
                from error
        self._metrics_http, _ = start_http_server(settings.metrics_port, settings.host, self.registry)
        metrics_port = int(self._metrics_http.server_port)
        await self.grpc.start()
        log.info("gRPC on %s:%d, metrics on http://%s:%d/metrics; loading ensembles from %s", settings.host,
                 grpc_port, settings.host, metrics_port, settings.repository)
        await self.repository.load_all(stopping=self._stopping.is_set)
        if self._stopping.is_set():
            return Ports(grpc_port, metrics_port)
        await self._server_state()
        ready = ", ".join(f"{m.name} v{m.version} ({m.ensemble.providers[0]})" for m in self.repository.served())
        log.info("ready: %s", ready or "no ensembles")
        return Ports(grpc_port, metrics_port)

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """Refuse new work, let in-flight requests finish, drain the batchers, close the ports."""
        log.info("shutting down: readiness NOT_SERVING, finishing in-flight requests (grace %.0f s)",
                 self.settings.shutdown_grace_s)
        self.servicer.shutting_down = True
        await self._server_state()
        await self.health.enter_graceful_shutdown()
        ends = time.monotonic() + self.settings.shutdown_grace_s
        # While in-flight requests finish, the port stays open: new requests get a clear
        # UNAVAILABLE from the servicer rather than a connection torn down under them.
        try:
            await asyncio.wait_for(self.servicer.drained(), self.settings.shutdown_grace_s)
        except asyncio.TimeoutError:
            log.warning("requests still in flight when the grace period ended")
        await self.grpc.stop(max(0.0, ends - time.monotonic()))
        try:  # queued batches of unloaded models drain within what is left of the grace period
            await asyncio.wait_for(self.repository.close(), max(0.0, ends - time.monotonic()))
        except asyncio.TimeoutError:
            log.warning("the grace period ended before every queued batch finished; exiting anyway")
        self._metrics_http.shutdown()
        log.info("stopped")


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    server = Server(settings)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, server.request_stop)
    await server.start()  # a signal during the loads ends them early (see load_all)
    await server.wait()
    await server.stop()
