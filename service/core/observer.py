"""What the serving core reports while it works, and the observer that ignores all of it.

The repository (loads and unloads), the batchers (model runs), the data plane (answered
requests) and the feedback (labels) report to one `Observer`. `ServingMetrics` turns the
reports into Prometheus series; `NullObserver` stands in when metrics are off, so the core
never asks whether anybody listens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

    from artefact.calibration import Scored
    from service.core.batching import BatchRecord
    from service.core.ensemble import Ensemble
    from service.feedback import CalibrationWindow


class Observer(Protocol):
    signal_outputs: tuple[str, ...]
    """Outputs every model run must compute for this observer, whatever the client asked for."""

    def observe_load(self, ensemble: Ensemble, drift_window: int = 0) -> None:
        """A version started serving; its drift score over `drift_window` answers (0: its baseline's window)."""

    def observe_unload(self, name: str, version: int) -> None:
        """A version stopped serving."""

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        """One model run finished."""

    def observe_request(self, name: str, version: str, code: str, seconds: float | None) -> None:
        """One inference request was answered with `code`; `seconds` when it reached a model."""

    def observe_refusal(self, name: str, version: str, reason: str) -> None:
        """A request was refused to protect the server: `reason` is queue_full, queue_wait or concurrency."""

    def observe_load_failure(self, name: str, version: int) -> None:
        """A version was refused at load (its files, manifest, samples or graphs)."""

    def observe_degraded(self, name: str, version: str, requests: int) -> None:
        """Overload cut the default plan of `requests` requests to the degraded plan."""

    def observe_abstentions(self, name: str, version: str, images: int, abstained: int) -> None:
        """An answer with an `abstain` output: of its `images`, the ensemble abstained on `abstained`."""

    def observe_sets(self, name: str, version: str, coverage: float, sizes: np.ndarray) -> None:
        """An answer with prediction sets at `coverage`: the size of each image's set."""

    def observe_set_label(self, name: str, version: int, coverage: float, covered: bool) -> None:
        """A label joined to a prediction answered with a set at `coverage`: whether the set held the true class."""

    def observe_label(self, name: str, version: int, scored: Scored) -> None:
        """One label was joined to the prediction served for it."""

    def observe_window(self, name: str, version: int, window: CalibrationWindow) -> None:
        """A model's calibration window took new labels."""


class NullObserver:
    """The observer when metrics are off: runs compute only what clients ask for, nothing is recorded."""

    signal_outputs: tuple[str, ...] = ()

    def observe_load(self, ensemble: Ensemble, drift_window: int = 0) -> None:
        pass

    def observe_unload(self, name: str, version: int) -> None:
        pass

    def observe_batch(self, name: str, version: int, classes: Sequence[str], record: BatchRecord) -> None:
        pass

    def observe_request(self, name: str, version: str, code: str, seconds: float | None) -> None:
        pass

    def observe_refusal(self, name: str, version: str, reason: str) -> None:
        pass

    def observe_load_failure(self, name: str, version: int) -> None:
        pass

    def observe_degraded(self, name: str, version: str, requests: int) -> None:
        pass

    def observe_abstentions(self, name: str, version: str, images: int, abstained: int) -> None:
        pass

    def observe_sets(self, name: str, version: str, coverage: float, sizes: np.ndarray) -> None:
        pass

    def observe_set_label(self, name: str, version: int, coverage: float, covered: bool) -> None:
        pass

    def observe_label(self, name: str, version: int, scored: Scored) -> None:
        pass

    def observe_window(self, name: str, version: int, window: CalibrationWindow) -> None:
        pass


NULL_OBSERVER = NullObserver()
