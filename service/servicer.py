"""The Open Inference Protocol v2 over gRPC: protobuf in, repository and batcher calls, protobuf out.

Thin on purpose: the models, batching and statistics live elsewhere; here are only the
conversions and the one table from our errors to gRPC status codes. An exception that is
not ours is a fault: logged with its traceback here, answered INTERNAL with a generic
message there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

import grpc
import numpy as np

from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import grpc_service_pb2_grpc as pb_grpc
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service._proto.valley.v1 import feedback_pb2_grpc as feedback_grpc
from service.batching import DeadlineExceeded, QueueFull
from service.calibration import CalibrationWindow, score
from service.codec import decode_inputs, encode_outputs
from service.errors import InvalidInput, ServingError
from service.feedback import AlreadyLabelled, Label, PredictionStore, UnknownPrediction
from service.manifest import OUTPUTS
from service.metrics import SIGNAL_OUTPUTS, ServingMetrics
from service.repository import LoadFailed, ModelNotFound, ModelNotReady, Repository, ServedModel
from service.statistics import Duration

log = logging.getLogger(__name__)

SERVER_NAME = "valley"
EXTENSIONS = ["model_repository", "statistics"]
PLATFORM = "valley_ensemble"
# Outputs sent when a request names none: all but the large per-member tensor, as in DESIGN §5.
DEFAULT_OUTPUTS = tuple(name for name in OUTPUTS if name != "member_probabilities")
STREAM_IN_FLIGHT = 256


class ShuttingDown(ServingError):
    """The server is draining before it exits: UNAVAILABLE, retry on another replica."""


class FeedbackOff(ServingError):
    """Feedback needs the metrics it feeds: FAILED_PRECONDITION."""


STATUS: dict[type[ServingError], grpc.StatusCode] = {
    UnknownPrediction: grpc.StatusCode.NOT_FOUND,
    AlreadyLabelled: grpc.StatusCode.ALREADY_EXISTS,
    FeedbackOff: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    QueueFull: grpc.StatusCode.UNAVAILABLE,
    ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    LoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and client-safe message for an error raised while serving a request."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return STATUS[kind], str(error)
    log.error("internal error while serving a request", exc_info=error)
    return grpc.StatusCode.INTERNAL, "internal error in the server (logged there); the request was not served"


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """End the call with this status; grpc's abort raises, and this says so to type checkers."""
    await context.abort(code, message)
    raise AssertionError("grpc's context.abort returned instead of raising")


def _server_version() -> str:
    try:
        return version("valley-ensembles")
    except PackageNotFoundError:
        return "unknown"


def _requested_outputs(request: pb.ModelInferRequest) -> tuple[str, ...]:
    if not request.outputs:
        return DEFAULT_OUTPUTS
    names = []
    for output in request.outputs:
        if any(key.startswith("shared_memory") for key in output.parameters):
            raise InvalidInput(f"output '{output.name}': shared-memory outputs are not supported; outputs come back "
                               "in the response")
        if "classification" in output.parameters:
            raise InvalidInput(f"output '{output.name}': classification (class_count) is not supported; ask for "
                               "'predicted_class' and 'confidence', or 'probabilities'")
        if output.name not in OUTPUTS:
            raise InvalidInput(f"unknown output {output.name!r}; outputs are {', '.join(OUTPUTS)}")
        if output.name in names:
            raise InvalidInput(f"output {output.name!r} is asked for twice")
        names.append(output.name)
    return tuple(names)


def _pixels(request: pb.ModelInferRequest, model: ServedModel, max_batch_size: int) -> np.ndarray:
    spec = model.ensemble.manifest.input
    for tensor in request.inputs:
        if any(key.startswith("shared_memory") for key in tensor.parameters):
            raise InvalidInput(f"input '{tensor.name}': shared-memory inputs are not supported; send the data in "
                               "the request")
    arrays = decode_inputs(request)
    if list(arrays) != [spec.name]:
        shape = ", ".join(str(d) for d in spec.shape)
        raise InvalidInput(f"model {model.name!r} takes exactly one input '{spec.name}' ({spec.datatype} [{shape}]), "
                           f"got {list(arrays) or 'none'}")
    pixels = arrays[spec.name]
    model.ensemble.check_input(pixels)
    if pixels.shape[0] > max_batch_size:
        raise InvalidInput(f"input '{spec.name}' has a batch of {pixels.shape[0]} images; this server takes at most "
                           f"{max_batch_size} per request (split the request)")
    return pixels


def _deadline(request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None) -> float | None:
    """The monotonic instant after which the answer is useless: the gRPC deadline or the `timeout` parameter."""
    deadlines = []
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        deadlines.append(time.monotonic() + remaining)
    if "timeout" in request.parameters:
        microseconds = request.parameters["timeout"].int64_param
        if microseconds > 0:
            deadlines.append(time.monotonic() + microseconds / 1e6)
    return min(deadlines) if deadlines else None


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _statistics(model: ServedModel) -> pb.ModelStatistics:
    stats = model.statistics.snapshot()
    return pb.ModelStatistics(
        name=model.name, version=str(model.version), last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(success=_duration(stats.success), fail=_duration(stats.fail),
                                           queue=_duration(stats.queue), compute_infer=_duration(stats.compute)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(runs))
                     for size, runs in sorted(stats.batches.items())])


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, max_batch_size: int, metrics: ServingMetrics | None = None,
                 predictions: PredictionStore | None = None) -> None:
        self.repository = repository
        self.max_batch_size = max_batch_size
        self.metrics = metrics
        self.predictions = predictions
        # With metrics on, every run also computes the label-free signals for every image.
        self._extra_outputs = SIGNAL_OUTPUTS if metrics is not None else ()
        self.shutting_down = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def drained(self) -> None:
        """Return once no inference request is being served."""
        await self._idle.wait()

    # -- health and metadata --------------------------------------------------------------

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
                          ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.shutting_down and self.repository.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelReadyResponse:
        try:
            self.repository.get(request.name, request.version)
        except ServingError:
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=not self.shutting_down)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
                             ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=_server_version(), extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
                            ) -> pb.ModelMetadataResponse:
        try:
            model = self.repository.get(request.name, request.version)
        except ServingError as error:
            await _abort(context, *status_of(error))
        manifest = model.ensemble.manifest
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name, versions=[str(model.version)], platform=PLATFORM,
            inputs=[tensor(name=manifest.input.name, datatype=manifest.input.datatype, shape=manifest.input.shape)],
            outputs=[tensor(name=o.name, datatype=o.datatype, shape=o.shape) for o in manifest.outputs])

    # -- inference ------------------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None
                     ) -> pb.ModelInferResponse:
        if self.shutting_down:
            raise ShuttingDown("the server is shutting down: send the request to another replica")
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self._infer_model(request, context)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _infer_model(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext | None
                           ) -> pb.ModelInferResponse:
        model = self.repository.get(request.model_name, request.model_version)
        started = time.monotonic()
        try:
            outputs = _requested_outputs(request)
            pixels = _pixels(request, model, self.max_batch_size)
            computed = tuple(dict.fromkeys([*outputs, *self._extra_outputs]))
            in_flight = self.metrics.in_flight_of(model.name, str(model.version)) if self.metrics else None
            if in_flight is not None:
                in_flight.inc()
            try:
                results = await model.batcher.submit(pixels, computed, _deadline(request, context))
            finally:
                if in_flight is not None:
                    in_flight.dec()
            if self.predictions is not None and request.id:
                self.predictions.remember(model.name, model.version, request.id, results["probabilities"])
            response = pb.ModelInferResponse(model_name=model.name, model_version=str(model.version), id=request.id)
            encode_outputs({name: results[name] for name in outputs}, response)
        except BaseException:
            model.statistics.record_request(time.monotonic() - started, ok=False)
            raise
        model.statistics.record_request(time.monotonic() - started, ok=True)
        return response

    def _observe(self, response: pb.ModelInferResponse, started: float) -> None:
        """Count one served request, labelled with the model and version that answered it."""
        if self.metrics is not None:
            self.metrics.observe_request(response.model_name, response.model_version, grpc.StatusCode.OK.name,
                                         time.monotonic() - started)

    def _observe_failure(self, request: pb.ModelInferRequest, code: grpc.StatusCode, started: float) -> None:
        """Count one failed request; requests for unknown models share empty labels (bounded cardinality)."""
        if self.metrics is None:
            return
        try:
            model = self.repository.get(request.model_name, request.model_version)
            name, version = model.name, str(model.version)
        except ServingError:
            name, version = "", ""
        reached_model = code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)
        self.metrics.observe_request(name, version, code.name, time.monotonic() - started if reached_model else None)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ModelInferResponse:
        started = time.monotonic()
        try:
            response = await self._infer(request, context)
        except Exception as error:
            code, message = status_of(error)
            self._observe_failure(request, code, started)
            await _abort(context, code, message)
        self._observe(response, started)
        return response

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream are served concurrently; each answer carries its request's id.

        A failed request answers with `error_message` and the stream goes on, as in Triton.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        # Requests of one stream in flight at once: a client that sends without reading stops
        # being read from, instead of growing the server's memory.
        in_flight = asyncio.Semaphore(STREAM_IN_FLIGHT)

        async def serve(request: pb.ModelInferRequest) -> None:
            started = time.monotonic()
            try:
                response = await self._infer(request, context)
                self._observe(response, started)
                final = request.parameters.get("triton_enable_empty_final_response")
                if final is not None and final.bool_param:
                    # One response per request: it is the final one (what such clients wait for).
                    response.parameters["triton_final_response"].bool_param = True
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except Exception as error:
                code, message = status_of(error)
                self._observe_failure(request, code, started)
                answer = pb.ModelStreamInferResponse(
                    error_message=f"{code.name}: {message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name,
                                                         model_version=request.model_version, id=request.id))
            finally:
                in_flight.release()
            await answers.put(answer)

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                async for request in request_iterator:
                    await in_flight.acquire()
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:  # answers already due go out before the stream ends, even if reading failed
                await asyncio.gather(*tasks, return_exceptions=True)
                await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()

    # -- statistics and repository --------------------------------------------------------

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
                              ) -> pb.ModelStatisticsResponse:
        try:
            name, version = request.name, request.version
            models = [self.repository.get(name, version)] if name else self.repository.served()
        except ServingError as error:
            await _abort(context, *status_of(error))
        return pb.ModelStatisticsResponse(model_stats=[_statistics(model) for model in models])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
                              ) -> pb.RepositoryIndexResponse:
        try:
            entries = self.repository.index()
        except ServingError as error:
            await _abort(context, *status_of(error))
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state.value, reason=e.reason)
            for e in entries if not request.ready or e.state.value == "READY"])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
                                  ) -> pb.RepositoryModelLoadResponse:
        try:
            if request.parameters:
                raise InvalidInput(f"load parameters ({', '.join(request.parameters)}) are not supported: publish "
                                   "the version into the repository folder, then load the model by name")
            await self.repository.load(request.model_name)
        except ServingError as error:
            await _abort(context, *status_of(error))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest,
                                    context: grpc.aio.ServicerContext) -> pb.RepositoryModelUnloadResponse:
        try:
            await self.repository.unload(request.model_name)
        except ServingError as error:
            await _abort(context, *status_of(error))
        return pb.RepositoryModelUnloadResponse()


class FeedbackServicer(feedback_grpc.FeedbackServicer):
    """valley.v1.Feedback: labels joined to served predictions feed the calibration metrics."""

    def __init__(self, predictions: PredictionStore | None, metrics: ServingMetrics | None, window: int) -> None:
        self.predictions, self.metrics, self.window = predictions, metrics, window
        self._windows: dict[tuple[str, int], CalibrationWindow] = {}

    async def Report(self, request: feedback_pb.ReportRequest, context: grpc.aio.ServicerContext
                     ) -> feedback_pb.ReportResponse:
        try:
            if self.predictions is None or self.metrics is None:
                raise FeedbackOff("feedback is off because the server runs without metrics (--metrics false)")
            if not request.labels:
                raise InvalidInput("the report holds no labels")
            joined = self.predictions.join([Label(label.model_name, label.request_id, label.position,
                                                  label.true_class) for label in request.labels])
        except ServingError as error:
            await _abort(context, *status_of(error))
        touched: dict[tuple[str, int], CalibrationWindow] = {}
        for label in joined:
            key = (label.model, label.version)
            window = self._windows.get(key)
            if window is None:
                window = self._windows[key] = CalibrationWindow(self.window)
            scored = score(label.probabilities, label.true_class)
            window.add(scored)
            self.metrics.observe_label(label.model, label.version, scored)
            touched[key] = window
        # The window's summary walks the whole window: once per model in the report, not per label.
        for (model, model_version), window in touched.items():
            self.metrics.observe_window(model, model_version, window)
        return feedback_pb.ReportResponse(accepted=len(joined))
