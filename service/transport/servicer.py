"""The Open Inference Protocol v2 and valley.v1.Feedback over gRPC: protobuf in, data plane calls, protobuf out.

Nothing else happens here. `add_servicer` registers every RPC of a service: it parses request
bodies itself (a body that does not parse is INVALID_ARGUMENT, not grpc's default) and wraps each
handler in `guarded`, which maps every exception through the one table in `service.errors`. An
exception that is not ours is logged with its traceback here and answered INTERNAL with a
generic message: no RPC answers UNKNOWN or carries a Python exception's text.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from artefact.manifest import TensorSpec
from service._proto.inference import grpc_service_pb2 as pb
from service._proto.inference import model_config_pb2 as config_pb
from service._proto.valley.v1 import calibration_pb2 as calibration_pb
from service._proto.valley.v1 import feedback_pb2 as feedback_pb
from service.control.control import Control
from service.control.recalibrate import Suggestion
from service.core.classification import PARAMETER as CLASSIFICATION
from service.core.inference import Framing, Inference, InferenceRequest, InferenceResponse, NamedStatistics
from service.core.request import Parameter
from service.core.statistics import Duration
from service.core.tensors import MAX_TENSORS
from service.errors import (
    MAX_NAME_CHARS,
    InvalidInput,
    ShuttingDown,
    Status,
    answer_of,
    check_length,
    shown,
)
from service.feedback import MAX_LABELS, Label
from service.transport.codec import (
    TYPED_ON_LOOP,
    encode_outputs,
    frame_inputs,
    refuse_shared_memory,
    typed_values,
)
from service.transport.concurrency import UNLIMITED, ConcurrencyLimit
from service.transport.security import CALLER, OPEN, Authorizer

STREAM_IN_FLIGHT = 256
"""Requests of one stream read and not yet answered."""
STREAM_BUFFER_BYTES = 16 << 20
"""Bytes of one stream's computed answers not yet written, beyond which no further request is read."""

Request = TypeVar("Request", bound=Message)
Response = TypeVar("Response", bound=Message)
Context: TypeAlias = grpc.aio.ServicerContext
Unary = Callable[[Request, Context], Awaitable[Response]]
Streaming = Callable[[AsyncIterator[Request], Context], AsyncIterator[Response]]
ServerStreaming = Callable[[Request, Context], AsyncIterator[Response]]


# -- the one guard around every RPC ---------------------------------------------------------


@dataclass(frozen=True)
class _Unparsed:
    """What the deserializer hands on for a body that is not a valid message of its type."""

    type_name: str


def _parser(message_class: type[Message]) -> Callable[[bytes], Message | _Unparsed]:
    def parse(body: bytes) -> Message | _Unparsed:
        try:
            return message_class.FromString(body)
        except Exception:  # DecodeError, and whatever else a hostile body makes protobuf raise
            return _Unparsed(message_class.DESCRIPTOR.full_name)

    return parse


def _parsed(request: Any) -> Any:
    if isinstance(request, _Unparsed):
        raise InvalidInput(f"the request body does not parse as a {request.type_name} message")
    return request


async def _parsed_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _parsed(request)


async def _abort(context: Context, status: Status) -> NoReturn:
    await context.abort(grpc.StatusCode[status.code], status.message)
    raise AssertionError("grpc's context.abort returned instead of raising")


def _admit(authorizer: Authorizer, method: str, context: Context) -> None:
    """Check the caller before anything else runs; the data plane reads who it is from `CALLER`."""
    CALLER.set(authorizer.check(method, context.invocation_metadata()))


# Each guard answers outside its `except` block, so the status's exception is not chained to grpc's abort (and
# kept alive with the request by it).


def guarded(handler: Unary[Request, Response], authorizer: Authorizer = OPEN,
            limit: ConcurrencyLimit = UNLIMITED) -> Unary[Request, Response]:
    """`handler` for authorized callers within the concurrency limit, answering every exception through the error
    table (INTERNAL for what is not ours)."""
    method = handler.__name__

    @functools.wraps(handler)
    async def call(request: Request, context: Context) -> Response:
        try:
            with limit.held():
                _admit(authorizer, method, context)
                return await handler(_parsed(request), context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            status = answer_of(error)
        del request
        await _abort(context, status)

    return call


def _guarded_generator(handler: Callable[[Any, Context], AsyncIterator[Response]], parse: Callable[[Any], Any],
                       authorizer: Authorizer, limit: ConcurrencyLimit) -> Callable[[Any, Context],
                                                                                     AsyncIterator[Response]]:
    """`guarded` for a handler that answers with an async generator: a failure ends the stream with a mapped
    status. `parse` hands the handler its request (a server stream) or its stream of requests (a bidirectional
    one, counted once for the limit however many requests it carries)."""
    method = handler.__name__

    @functools.wraps(handler)
    async def call(arriving: Any, context: Context) -> AsyncIterator[Response]:
        try:
            with limit.held():
                _admit(authorizer, method, context)
                async for response in handler(parse(arriving), context):
                    yield response
                return
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            status = answer_of(error)
        del arriving
        await _abort(context, status)

    return call


def guarded_server_stream(handler: ServerStreaming[Request, Response], authorizer: Authorizer = OPEN,
                          limit: ConcurrencyLimit = UNLIMITED) -> ServerStreaming[Request, Response]:
    """`guarded` for a request answered by an async generator of responses."""
    return _guarded_generator(handler, _parsed, authorizer, limit)


def guarded_stream(handler: Streaming[Request, Response], authorizer: Authorizer = OPEN,
                   limit: ConcurrencyLimit = UNLIMITED) -> Streaming[Request, Response]:
    """`guarded` for a bidirectional stream."""
    return _guarded_generator(handler, _parsed_stream, authorizer, limit)


def add_servicer(server: grpc.aio.Server, servicer: object, service: ServiceDescriptor,
                 authorizer: Authorizer = OPEN, limit: ConcurrencyLimit = UNLIMITED) -> None:
    """Serve every method of `service` with the `servicer` method of its name, authorized, limited, parsed and
    guarded (open and unlimited by default: grpc.health.v1 and reflection, whose bodies are parsed here too)."""
    handlers = {}
    for method in service.methods:
        handler = getattr(servicer, method.name)  # a missing method fails at start, not at the first call
        request_class, response_class = GetMessageClass(method.input_type), GetMessageClass(method.output_type)
        options = {"request_deserializer": _parser(request_class),
                   "response_serializer": response_class.SerializeToString}
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                guarded_stream(handler, authorizer, limit), **options)
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(guarded(handler, authorizer, limit),
                                                                        **options)
        elif method.server_streaming:  # an async generator, or a coroutine that writes with context.write
            streaming = guarded_server_stream(handler, authorizer, limit) if inspect.isasyncgenfunction(handler) \
                else guarded(handler, authorizer, limit)
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(streaming, **options)
        else:
            raise NotImplementedError(f"{service.full_name}/{method.name}: client streams alone are not served")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


# -- protobuf <-> data plane --------------------------------------------------------------


def _framing(request: pb.ModelInferRequest) -> Framing:
    """The request's inputs framed (data unread), the outputs it asks for and their class counts."""
    if len(request.outputs) > MAX_TENSORS:
        raise InvalidInput(f"the request asks for {len(request.outputs)} outputs; at most {MAX_TENSORS} are taken")
    for output in request.outputs:
        check_length("an output's name", output.name)
        refuse_shared_memory("output", output.name, output.parameters)
    classification: dict[str, object] = {output.name: _value(output.parameters[CLASSIFICATION])
                                         for output in request.outputs if CLASSIFICATION in output.parameters}
    return frame_inputs(request), tuple(output.name for output in request.outputs), classification


def _deadline(context: Context) -> float | None:
    """The gRPC deadline as a monotonic instant."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _value(parameter: pb.InferParameter) -> bool | int | float | str:
    """A parameter's value, of whichever kind was set ("" for none)."""
    kind = parameter.WhichOneof("parameter_choice")
    value: bool | int | float | str = getattr(parameter, kind) if kind else ""
    return value


def _inference_request(request: pb.ModelInferRequest, context: Context) -> InferenceRequest:
    if len(request.parameters) > MAX_TENSORS * 4:
        raise InvalidInput(f"the request has {len(request.parameters)} parameters; at most {MAX_TENSORS * 4} are "
                           "taken")
    return InferenceRequest.framed(
        request.model_name, request.model_version, request.id, functools.partial(_framing, request),
        parameters={key: _value(value) for key, value in request.parameters.items()}, deadline=_deadline(context),
        caller=CALLER.get().principal, heavy=typed_values(request) > TYPED_ON_LOOP)


def _set_parameters(target: MutableMapping[str, pb.InferParameter], parameters: dict[str, Parameter]) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = value


def _response(answer: InferenceResponse) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=answer.model, model_version=answer.version, id=answer.id)
    _set_parameters(response.parameters, answer.parameters)
    encode_outputs(answer.outputs, response)
    return response


def _tensor_metadata(spec: TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def _model_statistics(named: NamedStatistics) -> pb.ModelStatistics:
    stats = named.statistics
    return pb.ModelStatistics(
        name=named.name, version=named.version, last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count, execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(success=_duration(stats.success), fail=_duration(stats.fail),
                                           queue=_duration(stats.queue), compute_infer=_duration(stats.compute)),
        batch_stats=[pb.InferBatchStatistics(batch_size=size, compute_infer=_duration(runs))
                     for size, runs in sorted(stats.batches.items())])


class _StreamBudget:
    """What one stream holds: requests read and not yet answered, and the bytes of answers waiting to be written."""

    def __init__(self, requests: int, answer_bytes: int) -> None:
        self._requests, self._bytes = requests, answer_bytes
        self._held_requests = self._held_bytes = 0
        self._freed = asyncio.Event()

    async def admit(self) -> None:
        """Wait until the stream may read one more request (one reader waits here), and count it."""
        while self._held_requests >= self._requests or self._held_bytes >= self._bytes:
            self._freed.clear()
            await self._freed.wait()
        self._held_requests += 1

    def hold(self, size: int) -> None:
        """An answer of `size` bytes is computed and waits to be written."""
        self._held_bytes += size

    def release(self, size: int) -> None:
        """An answer is written: its request and bytes no longer count."""
        self._held_requests -= 1
        self._held_bytes -= size
        self._freed.set()


class InferenceServicer:
    """inference.GRPCInferenceService, answered by the data plane."""

    def __init__(self, inference: Inference, control: Control) -> None:
        self.inference, self.control = inference, control
        self._readers: set[asyncio.Task[None]] = set()

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.inference.live())

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.inference.ready())

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.inference.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context
                             ) -> pb.ServerMetadataResponse:
        metadata = self.inference.server_metadata()
        return pb.ServerMetadataResponse(name=metadata.name, version=metadata.version,
                                         extensions=list(metadata.extensions))

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        metadata = self.inference.model_metadata(request.name, request.version)
        response = pb.ModelMetadataResponse(name=metadata.name, versions=metadata.versions,
                                            platform=metadata.platform,
                                            inputs=[_tensor_metadata(spec) for spec in metadata.inputs],
                                            outputs=[_tensor_metadata(spec) for spec in metadata.outputs])
        _set_parameters(response.parameters, metadata.parameters)
        return response

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        config = self.inference.model_config(request.name, request.version)
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, config_pb.ModelConfig()))

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        return _response(await self.inference.infer(_inference_request(request, context)))

    async def ModelStreamInfer(self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
                               ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests on one stream are served concurrently; each answer carries its request's id.

        A failed request answers with `error_message` and the stream goes on, as in Triton. A request
        counts against the stream's budget from when it is read until its answer has been written: a
        client that sends without reading its answers stops being read from, and the server holds at
        most STREAM_IN_FLIGHT requests and about STREAM_BUFFER_BYTES of answers for it.
        """
        inference = self.inference
        if inference.shutting_down:
            raise ShuttingDown("the server is shutting down: open the stream to another replica")
        answers: asyncio.Queue[tuple[pb.ModelStreamInferResponse, int] | None] = asyncio.Queue()
        budget = _StreamBudget(STREAM_IN_FLIGHT, STREAM_BUFFER_BYTES)
        closed = False

        async def serve(request: pb.ModelInferRequest) -> None:
            try:
                response = _response(await self.inference.infer(_inference_request(request, context)))
                final = request.parameters.get("triton_enable_empty_final_response")
                if final is not None and final.bool_param:
                    # One response per request: it is the final one (what such clients wait for).
                    response.parameters["triton_final_response"].bool_param = True
                answer = pb.ModelStreamInferResponse(infer_response=response)
            except asyncio.CancelledError:
                inference.release()
                raise
            except Exception as error:
                status = answer_of(error)
                answer = pb.ModelStreamInferResponse(
                    error_message=f"{status.code}: {status.message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name[:MAX_NAME_CHARS],
                                                         model_version=request.model_version[:MAX_NAME_CHARS],
                                                         id=request.id[:MAX_NAME_CHARS]))
            if closed:  # the stream ended meanwhile: nobody will write this answer
                inference.release()
                return
            size = answer.ByteSize()
            budget.hold(size)
            answers.put_nowait((answer, size))

        async def read() -> None:
            tasks: set[asyncio.Task[None]] = set()
            try:
                while True:
                    await budget.admit()
                    request = await anext(requests, None)
                    if request is None:
                        break
                    inference.hold()  # from here until its answer is written, a shutdown waits for it
                    task = asyncio.create_task(serve(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            finally:  # answers already due go out before the stream ends, even if reading failed
                await asyncio.gather(*tasks, return_exceptions=True)
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        self._readers.add(reader)
        try:
            while (item := await answers.get()) is not None:
                answer, size = item
                try:
                    yield answer  # resumes once grpc has taken the answer: a client that does not read holds us here
                finally:
                    budget.release(size)
                    inference.release()
            try:
                await reader  # surfaces a broken request stream
            except asyncio.CancelledError:
                if not inference.shutting_down:
                    raise
                raise ShuttingDown("the server is shutting down: open a new stream to another replica") from None
        finally:
            self._readers.discard(reader)
            reader.cancel()
            closed = True  # answers owed to a client that went away are no longer waited for
            while not answers.empty():
                if answers.get_nowait() is not None:
                    inference.release()

    def end_streams(self) -> None:
        """Stop reading every open stream: each ends, UNAVAILABLE, once the answers it owes are written."""
        for reader in list(self._readers):
            reader.cancel()

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context
                              ) -> pb.ModelStatisticsResponse:
        return pb.ModelStatisticsResponse(model_stats=[
            _model_statistics(named) for named in self.inference.statistics(request.name, request.version)])

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context
                              ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[
            index(name=e.name, version=e.version, state=e.state.value, reason=shown(e.reason))
            for e in await self.control.index(ready_only=request.ready)])

    async def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest, context: Context
                                  ) -> pb.RepositoryModelLoadResponse:
        parameters = request.parameters
        config = parameters["config"].string_param if "config" in parameters else None
        await self.control.load(request.model_name, config, [key for key in parameters if key != "config"])
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest, context: Context
                                    ) -> pb.RepositoryModelUnloadResponse:
        await self.control.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class FeedbackServicer:
    """valley.v1.Feedback: labels for served predictions, joined and counted by the data plane."""

    def __init__(self, control: Control) -> None:
        self.control = control

    async def Report(self, request: feedback_pb.ReportRequest, context: Context) -> feedback_pb.ReportResponse:
        # One past the limit is enough for the data plane to refuse an oversized report.
        labels = [Label(label.model_name, label.request_id, label.position, label.true_class)
                  for label in request.labels[:MAX_LABELS + 1]]
        return feedback_pb.ReportResponse(accepted=await self.control.report(labels, CALLER.get().principal))


def _live(metrics: dict[str, float]) -> calibration_pb.LiveMetrics:
    return calibration_pb.LiveMetrics(nll=metrics["nll"], ece=metrics["ece"], accuracy=metrics["accuracy"])


def _suggestion(name: str, version: int, suggestion: Suggestion) -> calibration_pb.Suggestion:
    return calibration_pb.Suggestion(
        model_name=name, model_version=str(version), labels=suggestion.labels, temperature=suggestion.temperature,
        suggested_temperature=suggestion.suggested, current=_live(suggestion.current_metrics),
        suggested=_live(suggestion.suggested_metrics))


class CalibrationServicer:
    """valley.v1.Calibration: the temperature live labels suggest, and a new version applying it."""

    def __init__(self, control: Control) -> None:
        self.control = control

    async def Suggest(self, request: calibration_pb.SuggestRequest, context: Context) -> calibration_pb.Suggestion:
        model, suggestion, _ = await asyncio.to_thread(self.control.suggestion, request.model_name,
                                                       request.model_version)
        return _suggestion(model.name, model.version, suggestion)

    async def Recalibrate(self, request: calibration_pb.RecalibrateRequest, context: Context
                          ) -> calibration_pb.RecalibrateResponse:
        name, version = request.model_name, request.model_version
        parent_version, new, suggestion, applied = await self.control.recalibrate(
            name, version, request.temperature, CALLER.get().principal)
        return calibration_pb.RecalibrateResponse(model_name=name, published_version=str(new),
                                                  suggestion=_suggestion(name, parent_version, suggestion),
                                                  temperature=applied)
