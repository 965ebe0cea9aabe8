"""How many members answer a request: the plans, the request parameter that picks one, the server's default.

A plan is a cascade (`artefact.cascade.Cascade`) with a name: `full` runs every member, a number
N runs the first N, `cascade` runs the anytime ensemble fitted at export (the full ensemble for
a version exported without one; with its front network where export put one before the
members), `front` the front network alone. A request picks its plan with the Open Inference
Protocol parameter `members` (a number, or the string "full", "cascade", "front" or a number);
without it the server's default (`--members`) applies. Under overload a batch may be served
`degraded`: the default plan is cut to the front network or the first stage (`degraded_plan`);
a plan the client named is never cut.
"""

from __future__ import annotations

from dataclasses import dataclass

from artefact.cascade import Cascade
from artefact.config import check_members
from artefact.manifest import Manifest
from service.errors import InvalidInput

PARAMETER = "members"
"""The request parameter (and the response parameter that says which plan answered)."""
DEGRADED = "degraded"
"""The response parameter set (true) when overload cut the plan."""
FULL, CASCADE, FRONT = "full", "cascade", "front"


@dataclass(frozen=True)
class Plan:
    """A named way of answering: `cascade` says which members run for which images."""

    name: str
    cascade: Cascade
    chosen: bool = False
    """The client asked for it: overload never cuts it."""

    @property
    def members(self) -> int:
        """The most members an image can go through."""
        return self.cascade.members


def check_default(value: str) -> str:
    """`--members`: 'cascade', 'full', 'front' or a positive number (a ValueError names what is wrong)."""
    return check_members(value, "--members")


def fitted_cascade(manifest: Manifest) -> Cascade:
    """The manifest's anytime ensemble (with its front network where it has one), or the full ensemble where it has
    none."""
    spec = manifest.cascade
    members = len(manifest.members)
    if spec is None:
        return Cascade.full(members)
    return Cascade(tuple(spec.stages), tuple(spec.thresholds), spec.front)


def front_only() -> Cascade:
    """The front network answers every image."""
    return Cascade((1,), (), front=0.0)


def requested(value: bool | int | float | str | None) -> str | int | None:
    """The `members` parameter as sent over either transport, for `plan` (which says what it accepts); None when
    absent."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return str(value)


def plan(manifest: Manifest, value: str | int, chosen: bool) -> Plan:
    """The plan that `value` names for this ensemble; `InvalidInput` saying what is accepted otherwise."""
    members = len(manifest.members)
    text = str(value).strip().lower()
    if text == FULL:
        return Plan(FULL, Cascade.full(members), chosen)
    if text == CASCADE:
        return Plan(CASCADE, fitted_cascade(manifest), chosen)
    if text == FRONT:
        if manifest.front is None:
            raise InvalidInput(f"parameter '{PARAMETER}' asks for the front network; {manifest.name!r} version "
                               f"{manifest.version} has none (export it with --front to add one)")
        return Plan(FRONT, front_only(), chosen)
    if text.isascii() and text.lstrip("-").isdigit():
        count = int(text)
        if 1 <= count <= members:
            return Plan(str(count), Cascade.full(count), chosen)
        raise InvalidInput(f"parameter '{PARAMETER}' asks for {count} members; {manifest.name!r} version "
                           f"{manifest.version} has {members} (ask for 1 to {members}, 'full' or 'cascade')")
    raise InvalidInput(f"parameter '{PARAMETER}' must be a number of members (1 to {members}), 'full', "
                       f"'cascade' or 'front', not {text[:40]!r}")


def default_plan(manifest: Manifest, default: str) -> Plan:
    """The server's default for this ensemble; a number above its member count means all of them, and `front` the
    fitted cascade for a version without a front network."""
    if default == FRONT and manifest.front is None:
        default = CASCADE
    if default.isdigit():
        default = str(min(int(default), len(manifest.members)))
    return plan(manifest, default, chosen=False)


def degraded_plan(manifest: Manifest) -> Plan:
    """What overload serves instead of the default: the front network where the fitted cascade starts with one,
    else the fitted cascade's first stage, or one member without a cascade that exits early."""
    cascade = fitted_cascade(manifest)
    if cascade.front is not None:
        return Plan(FRONT, front_only())
    first = cascade.stages[0] if len(cascade.stages) > 1 else 1
    return Plan(str(first), Cascade.full(first))
