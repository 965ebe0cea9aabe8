"""An inference request's own parameters, whatever transport carried them, read and checked in one place.

Both transports hand the request-level parameters over as sent (gRPC's `InferParameter` values,
HTTP's JSON `parameters` object: booleans, numbers and strings), so a malformed one gets the same
status and message over either: `timeout` (microseconds, as Triton's clients send it),
`members` (`service.core.members`), `target_accuracy` (`service.core.abstention`), `coverage` and
`conformal_score` (`service.core.sets`) and
`binary_data_output` (HTTP's default for outputs; over gRPC every output is binary, but the value
is still checked). Parameters valley does not know are ignored, as Triton does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from service.core.abstention import PARAMETER as TARGET_PARAMETER
from service.core.members import PARAMETER as MEMBERS_PARAMETER
from service.core.members import requested
from service.core.sets import COVERAGE, SCORE, score_of
from service.errors import InvalidInput

Parameter = bool | int | float | str
TIMEOUT = "timeout"
BINARY_OUTPUT = "binary_data_output"
MAX_TIMEOUT_US = 86_400 * 10**6
"""Longest `timeout` taken (a day): beyond it a number is a mistake, not a wish."""


@dataclass(frozen=True)
class RequestOptions:
    """What a request's parameters ask for, checked."""

    deadline: float | None = None
    """The `time.monotonic()` instant after which the answer is useless: the earlier of the transport's deadline
    (gRPC's) and the `timeout` parameter."""
    members: str | int | None = None
    """Which members answer (`service.core.members.plan` checks it against the model); None: the model's default."""
    target_accuracy: float | None = None
    """The abstention target; None: the model's default."""
    coverage: float | None = None
    """The prediction sets' coverage; None: the model's default."""
    conformal_score: str | None = None
    """The prediction sets' conformity score; None: the model's default."""
    binary_output: bool = False


def _timeout(value: Parameter) -> float | None:
    """`timeout` in seconds (None for 0: no bound)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON writes some whole numbers as 1e6
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TIMEOUT_US:
        shown = repr(value)[:40]
        raise InvalidInput(f"parameter '{TIMEOUT}' must be a whole number of microseconds from 0 (no bound) to "
                           f"{MAX_TIMEOUT_US}, got {shown}")
    return value / 1e6 if value else None


def _fraction(value: Parameter, name: str, meaning: str) -> float:
    """A parameter that is a number in (0, 1], or a string holding one; `InvalidInput` saying what it takes."""
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except ValueError:
        number = math.nan
    if not 0 < number <= 1:
        raise InvalidInput(f"parameter '{name}' must be a number in (0, 1], {meaning}, not {str(value)[:40]!r}")
    return number


def request_options(parameters: Mapping[str, Parameter], transport_deadline: float | None = None) -> RequestOptions:
    """The request's parameters read once; `InvalidInput` naming the first malformed one and what it takes."""
    deadlines = [] if transport_deadline is None else [transport_deadline]
    if TIMEOUT in parameters and (seconds := _timeout(parameters[TIMEOUT])) is not None:
        deadlines.append(time.monotonic() + seconds)
    binary = parameters.get(BINARY_OUTPUT, False)
    if not isinstance(binary, bool):
        raise InvalidInput(f"parameter '{BINARY_OUTPUT}' must be true or false, got {repr(binary)[:40]}")
    target, coverage, score = (parameters.get(name) for name in (TARGET_PARAMETER, COVERAGE, SCORE))
    return RequestOptions(
        min(deadlines) if deadlines else None, requested(parameters.get(MEMBERS_PARAMETER)),
        None if target is None else _fraction(target, TARGET_PARAMETER, "the accuracy wanted where it answers "
                                              "(e.g. 0.97)"),
        None if coverage is None else _fraction(coverage, COVERAGE, "the share of images whose set holds the true "
                                                "class (e.g. 0.9)"),
        None if score is None else score_of(score), binary)
