"""Every error the server answers with, and the one table from error to gRPC status code.

Codes are named as `grpc.StatusCode` names, so the core and the data plane stay free of gRPC
(the metrics count requests by these names too); the servicer turns a name into the code.
Anything that is not a `ServingError` is a fault of ours: INTERNAL, with a generic message.
"""

from __future__ import annotations

import logging
import re
import traceback
from dataclasses import dataclass

log = logging.getLogger(__name__)


class ServingError(Exception):
    """A request the server cannot serve; the message is safe to show to the client."""


class InvalidInput(ServingError, ValueError):
    """A request's tensors or fields do not fit (name, datatype, shape, size or values): INVALID_ARGUMENT."""


class ModelNotFound(ServingError):
    """No such ensemble or version in the repository: NOT_FOUND."""


class ModelNotReady(ServingError):
    """The ensemble exists but is not serving (loading, failed, unloaded, shutting down): UNAVAILABLE."""


class Retired(ModelNotReady):
    """The version stopped taking requests (another swapped in, or it was unloaded); the data plane sends the
    request on to what serves now."""


class ModelControlOff(ServingError):
    """Load and unload requests are off (--model-control-mode none): FAILED_PRECONDITION."""


class NotEnoughLabels(ServingError):
    """Recalibration asked for before enough labels came back: FAILED_PRECONDITION."""


class RepositoryNotWritable(ServingError):
    """A version the server publishes (recalibration) cannot be written into the repository: FAILED_PRECONDITION."""


class LoadFailed(ServingError):
    """A version could not be loaded (bad manifest, changed file, wrong samples): FAILED_PRECONDITION."""


class QueueFull(ServingError):
    """The queue is at its bound: UNAVAILABLE, try again later."""


class QueueWait(ServingError):
    """The request would wait, or has waited, longer than the queue's bound: UNAVAILABLE, try again later."""


class Overloaded(ServingError):
    """The server is at its limit of concurrent RPCs: UNAVAILABLE, try again later or on another replica."""


class DeadlineExceeded(ServingError):
    """The request's deadline passed while it waited: it was dropped before compute."""


class ShuttingDown(ServingError):
    """The server is draining before it exits: UNAVAILABLE, retry on another replica."""


class UnknownPrediction(ServingError):
    """No kept prediction has that model, request id and position (never served, or expired): NOT_FOUND."""


class AlreadyLabelled(ServingError):
    """That prediction already has its label; it is not counted twice: ALREADY_EXISTS."""


class FeedbackOff(ServingError):
    """The server keeps no predictions to label (feedback is off): FAILED_PRECONDITION."""


class StoreUnavailable(ServingError):
    """The feedback store cannot be reached now, so labels cannot be committed: UNAVAILABLE, report them again."""


class Superseded(ServingError):
    """A newer version of the ensemble exists (published meanwhile): FAILED_PRECONDITION."""


class Unauthenticated(ServingError):
    """No bearer token, or one the server does not know: UNAUTHENTICATED."""


class PermissionDenied(ServingError):
    """A valid token without the role the RPC needs: PERMISSION_DENIED."""


STATUS: dict[type[ServingError], str] = {
    InvalidInput: "INVALID_ARGUMENT",
    ModelNotFound: "NOT_FOUND",
    ModelNotReady: "UNAVAILABLE",
    LoadFailed: "FAILED_PRECONDITION",
    NotEnoughLabels: "FAILED_PRECONDITION",
    RepositoryNotWritable: "FAILED_PRECONDITION",
    ModelControlOff: "FAILED_PRECONDITION",
    QueueFull: "UNAVAILABLE",
    QueueWait: "UNAVAILABLE",
    Overloaded: "UNAVAILABLE",
    DeadlineExceeded: "DEADLINE_EXCEEDED",
    ShuttingDown: "UNAVAILABLE",
    UnknownPrediction: "NOT_FOUND",
    AlreadyLabelled: "ALREADY_EXISTS",
    FeedbackOff: "FAILED_PRECONDITION",
    StoreUnavailable: "UNAVAILABLE",
    Superseded: "FAILED_PRECONDITION",
    Unauthenticated: "UNAUTHENTICATED",
    PermissionDenied: "PERMISSION_DENIED",
}
# The HTTP status of each code: Google's canonical mapping (google/rpc/code.proto), which is also how Triton and
# KServe answer the codes they share (Triton answers ALREADY_EXISTS 400 where this says 409).
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
INTERNAL = "INTERNAL"
INTERNAL_MESSAGE = "internal error in the server (logged there); the request was not served"


@dataclass(frozen=True)
class Status:
    """A gRPC status code's name and the message the client gets."""

    code: str
    message: str

    @property
    def internal(self) -> bool:
        """A fault of the server, not of the request: log it with its traceback."""
        return self.code == INTERNAL


MAX_MESSAGE = 400
# Longest model name, version and request id taken: an id is kept with its prediction for feedback, so
# its size bounds that store's memory as much as the count of predictions does.
MAX_NAME_CHARS = 256


def check_length(field: str, value: str) -> None:
    """Refuse an overlong client string without echoing it."""
    if len(value) > MAX_NAME_CHARS:
        raise InvalidInput(f"{field} has {len(value)} characters; at most {MAX_NAME_CHARS} are taken")


# An absolute path of the server's disk: the client gets its last three parts (ensemble/version/file), never
# where the repository lies.
_HOST_PATH = re.compile(r"(?<![\w.:/])/(?:[^\s/'\"]+/)*([^\s/'\"]+/[^\s/'\"]+/[^\s/'\"]+)")


def shown(message: str) -> str:
    """`message` as a client may see it: one line, no host paths, at most MAX_MESSAGE characters."""
    line = _HOST_PATH.sub(r"\1", " ".join(message.split()))
    return line if len(line) <= MAX_MESSAGE else line[: MAX_MESSAGE - 20] + " ... (message cut)"


def answer_of(error: BaseException) -> Status:
    """The status an exception is answered with; a fault of ours is logged here with its traceback.

    The exception's frames are cleared once it is answered: they hold the request (up to --max-message-bytes),
    which would otherwise live in a reference cycle until the garbage collector's next full pass.
    """
    status = status_of(error)
    if status.internal:
        log.error("internal error while serving a request", exc_info=error)
    traceback.clear_frames(error.__traceback__)
    return status


def status_of(error: BaseException) -> Status:
    """The status a request that raised `error` is answered with; never the exception's text unless it is ours,
    and ours only short, on one line and without host paths (it may quote what the client sent)."""
    for kind in type(error).__mro__:
        if kind in STATUS:
            return Status(STATUS[kind], shown(str(error)))
    return Status(INTERNAL, INTERNAL_MESSAGE)
