"""Prediction sets at serve time: the `prediction_set` and `set_size` outputs, the `coverage` and `conformal_score`
request parameters.

An ensemble exported with conformal scores (`artefact.conformal`, the manifest's `conformal`)
answers, per image, the set of classes that holds the true class with the requested coverage
(BOOL [B, C]) and its size (INT64 [B]). The guarantee is split conformal's: over images like the
validation split's, the set holds the true class at least `coverage` of the time, at most about
1 / (n + 1) more (n validation images). A request names the coverage with the parameter
`coverage` (a number in (0, 1], or a string holding one) and the score with `conformal_score`
(lac, aps or raps); without them the model's config.json defaults apply, else the manifest's.
Any coverage is answered from the sorted calibration scores, not only a fitted grid.

The scores were fitted on the full ensemble's probabilities at the exported temperature. A
recalibrated version serves at another temperature: its probabilities are brought back to the
fitted one before the sets are formed, as abstention does. Images a cascade answered with fewer
members get sets from the probabilities served (the cascade keeps them within its fitted NLL bound
of the full ensemble's; the export measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from artefact.conformal import SCORES, Conformal, Score
from artefact.manifest import ConformalSpec, Manifest
from artefact.uncertainty import outputs_at
from service.core.ensemble import MEMBERS_USED
from service.errors import InvalidInput

PREDICTION_SET = "prediction_set"
"""The output: BOOL [B, C], true for the classes in each image's set."""
SET_SIZE = "set_size"
"""The output: INT64 [B], the classes in each image's set."""
OUTPUTS = (PREDICTION_SET, SET_SIZE)
COVERAGE = "coverage"
"""The request parameter (and the response parameter saying which coverage answered)."""
SCORE = "conformal_score"
"""The request parameter (and the response parameter saying which score answered)."""


def score_of(value: object) -> Score:
    """The `conformal_score` parameter; `InvalidInput` naming the scores otherwise."""
    for score in SCORES:
        if value == score:
            return score
    raise InvalidInput(f"parameter '{SCORE}' must be one of {', '.join(SCORES)}, not {str(value)[:40]!r}")


def no_sets(name: str, version: int) -> str:
    return (f"model {name!r} version {version} was exported without conformal scores, so it has no "
            f"'{PREDICTION_SET}' or '{SET_SIZE}' output and takes no '{COVERAGE}' or '{SCORE}' (export it again to "
            "get them)")


@dataclass
class PredictionSets:
    """One version's conformal scores, and the sets of a batch of answers."""

    spec: ConformalSpec
    ratio: float
    """The serving temperature over the one the scores were fitted at (1: the same)."""
    default_coverage: float
    default_score: Score
    _fitted: dict[Score, Conformal] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, coverage: float | None = None, score: str | None = None
           ) -> PredictionSets | None:
        """The manifest's prediction sets (None for a version exported without them) with the configured defaults
        (None: the manifest's); `InvalidInput` where the version cannot take them."""
        spec = manifest.conformal
        if spec is None:
            if coverage is not None or score is not None:
                raise InvalidInput(f"coverage or conformal_score is configured, but "
                                   f"{no_sets(manifest.name, manifest.version)}; leave them out of the model's "
                                   "config.json")
            return None
        fitted = {entry.score: Conformal.of(entry) for entry in spec.scores}
        chosen = spec.default_score if score is None else score_of(score)
        if chosen not in fitted:
            raise InvalidInput(f"conformal_score {chosen!r} is configured, but version {manifest.version} has only "
                               f"{', '.join(fitted)}")
        return cls(spec, manifest.temperature_ratio(spec.temperature),
                   spec.default_coverage if coverage is None else coverage, chosen, fitted)

    @property
    def needs(self) -> tuple[str, ...]:
        """The outputs a batch must compute for `sets`."""
        if self.ratio == 1.0:
            return ("probabilities",)
        return ("probabilities", "member_probabilities", MEMBERS_USED)

    def score(self, requested: str | None) -> Score:
        """The score a request gets: the one it names (checked against the version's), else the default."""
        if requested is None:
            return self.default_score
        score = score_of(requested)
        if score not in self._fitted:
            raise InvalidInput(f"parameter '{SCORE}' {score!r}: this version has only {', '.join(self._fitted)}")
        return score

    def sets(self, outputs: dict[str, np.ndarray], coverage: float, score: Score) -> np.ndarray:
        """The prediction sets, BOOL [B, C], of a batch's outputs (holding `needs`)."""
        probabilities = outputs["probabilities"]
        if self.ratio != 1.0:
            probabilities = outputs_at(outputs["member_probabilities"], outputs[MEMBERS_USED], self.ratio,
                                       probabilities)["probabilities"]
        return self._fitted[score].sets(probabilities, coverage)


def coverage_label(coverage: float) -> str:
    """The coverage as a metric label: up to three decimals as written (0.9, 0.95, 0.995), any finer one "other", so
    clients choosing coverages cannot make unbounded series (at most 1,000 per model version)."""
    return f"{coverage:g}" if round(coverage, 3) == coverage else "other"

