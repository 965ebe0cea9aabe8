"""Selective prediction at serve time: the `abstain` output and the `target_accuracy` request parameter.

An ensemble exported with a selective spec (`artefact.selective`, the manifest's `selective`)
answers an `abstain` output: true for every image whose score under the chosen signal is below
the threshold of the request's target accuracy. A request names its target with the Open
Inference Protocol parameter `target_accuracy` (a number in (0, 1], or a string holding one);
without it the manifest's default applies. Targets fitted at export use their exact threshold;
any other is read off the stored validation curve (its points at 1 % coverage resolution) with
the same margin, so it too is met on validation with two standard errors to spare. A target
that no threshold meets abstains on every image.

A version made by recalibration (`service.control.recalibrate`) serves at a new temperature, but its
thresholds were fitted at the old one: its members' probabilities are brought back to that
temperature before scoring, so the decision stays the one validation vouches for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from artefact.manifest import Manifest, SelectiveSpec
from artefact.selective import SERVED_FROM, RiskCoverage, fit_threshold, score_served
from artefact.uncertainty import outputs_at
from service.core.ensemble import MEMBERS_USED
from service.errors import InvalidInput

ABSTAIN = "abstain"
"""The output: one flag per image, true where the ensemble abstains."""
PARAMETER = "target_accuracy"
"""The request parameter (and the response parameter saying which target answered)."""


@dataclass
class Abstention:
    """One version's selective prediction: thresholds by target, and the flags of a batch of answers."""

    spec: SelectiveSpec
    ratio: float
    """The serving temperature over the one the thresholds were fitted at (1: the same)."""
    default_target: float
    """The target of a request that names none: the model's configuration's, else the manifest's."""
    _thresholds: dict[float, float] = field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, default_target: float | None = None) -> Abstention | None:
        """The manifest's selective prediction (None for a version exported without it) answering `default_target`
        (None: the manifest's) where a request names none; `InvalidInput` where the version cannot take that
        target."""
        spec = manifest.selective
        if spec is None:
            if default_target is not None:
                raise InvalidInput(f"target_accuracy {default_target:g} is configured, but version "
                                   f"{manifest.version} was exported without selective prediction (export it with "
                                   "it, or leave target_accuracy out of the model's config.json)")
            return None
        abstention = cls(spec, manifest.temperature_ratio(spec.temperature),
                         spec.default_target if default_target is None else default_target)
        abstention.threshold(abstention.default_target)
        return abstention

    @property
    def needs(self) -> tuple[str, ...]:
        """The outputs a batch must compute for `flags`."""
        if self.ratio == 1.0:
            return (SERVED_FROM[self.spec.signal],)
        return ("probabilities", "member_probabilities", MEMBERS_USED)

    def threshold(self, target: float) -> float:
        """The lowest score answered at `target` accuracy (inf: no threshold meets it, every image abstains)."""
        cached = self._thresholds.get(target)
        if cached is not None:
            return cached
        fitted = {entry.target_accuracy: entry.threshold for entry in self.spec.thresholds}
        if target in fitted:
            threshold = fitted[target]
        else:
            curve = self.spec.curve()
            if not curve.thresholds:
                raise InvalidInput(f"parameter '{PARAMETER}' {target:g}: this version stores thresholds only for the "
                                   f"targets fitted at export ({', '.join(f'{t:g}' for t in fitted)}); export it "
                                   "again to ask for any other")
            points = RiskCoverage(np.asarray(curve.coverage), np.asarray(curve.accuracy),
                                  np.asarray(curve.thresholds), curve.count)
            threshold = fit_threshold(points, target, self.spec.margin)
        value = math.inf if threshold is None else threshold
        if len(self._thresholds) < 1024:  # targets come from requests: the cache stays bounded
            self._thresholds[target] = value
        return value

    def flags(self, outputs: dict[str, np.ndarray], target: float) -> np.ndarray:
        """Abstain (true) or answer, per image of a batch's outputs (holding `needs`)."""
        if self.ratio != 1.0:
            outputs = outputs_at(outputs["member_probabilities"], outputs[MEMBERS_USED], self.ratio,
                                 outputs["probabilities"])
        flags: np.ndarray = score_served(self.spec.signal, outputs) < self.threshold(target)
        return flags
