"""Which versions of an ensemble to serve: Triton's version policy (latest N, all, or specific versions).

A policy comes from the server's `--version-policy` ("latest:1", "latest:2", "all", "specific:3" or
"specific:2,3"), from `<repository>/<name>/config.json` (`{"version_policy": ...}` in Triton's JSON
form), or from a load RPC's `config` parameter (what `tritonclient`'s `load_model(config=...)`
sends), the last one winning: pinning `specific` versions is how a version is held or rolled back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal


class PolicyError(ValueError):
    """A version policy that cannot be read; the message says what is accepted."""


MAX_VERSIONS = 64
"""Most versions one policy may name or keep."""


@dataclass(frozen=True)
class VersionPolicy:
    kind: Literal["latest", "all", "specific"] = "latest"
    count: int = 1
    """latest: how many of the newest versions serve."""
    versions: tuple[int, ...] = ()
    """specific: the versions that serve."""

    def candidates(self, on_disk: list[int]) -> list[int]:
        """The versions worth trying, best first: a `latest` policy takes the first `count` of them that load."""
        newest_first = sorted(on_disk, reverse=True)
        if self.kind == "specific":
            return [version for version in newest_first if version in self.versions]
        return newest_first

    @property
    def serves_newest(self) -> bool:
        """Whether a version newer than every other would serve once it loads (a specific policy pins others)."""
        return self.kind != "specific"

    @property
    def wanted(self) -> int:
        """How many versions the policy serves at most."""
        return self.count if self.kind == "latest" else MAX_VERSIONS

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.count}"
        if self.kind == "all":
            return "all"
        return "specific:" + ",".join(str(version) for version in self.versions)

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """'latest:N', 'all' or 'specific:V[,V...]'."""
        kind, _, argument = text.strip().partition(":")
        try:
            if kind == "latest":
                return cls._checked("latest", count=int(argument or "1"))
            if kind == "all" and not argument:
                return cls("all")
            if kind == "specific":
                return cls._checked("specific", versions=tuple(int(v) for v in argument.split(",")))
        except ValueError:
            pass
        raise PolicyError(f"version policy {text[:100]!r}: use 'latest:N', 'all' or 'specific:V[,V...]'")

    @classmethod
    def from_config(cls, text: str, where: str) -> VersionPolicy | None:
        """The policy of a Triton-style JSON model config (`{"version_policy": {"latest": {"num_versions": 2}}}`,
        `{"all": {}}` or `{"specific": {"versions": [3]}}`); None when the config sets none."""
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):
            raise PolicyError(f"{where} is not JSON") from None
        if not isinstance(config, dict):
            raise PolicyError(f"{where} must be a JSON object")
        unknown = sorted(set(config) - {"version_policy"})
        if unknown:
            raise PolicyError(f"{where}: only 'version_policy' can be set, not {', '.join(unknown)[:100]}")
        policy = config.get("version_policy")
        if policy is None:
            return None
        return cls.from_json(policy, where)

    @classmethod
    def from_json(cls, policy: Any, where: str) -> VersionPolicy:
        usage = (f"{where}: version_policy must be one of {{\"latest\": {{\"num_versions\": N}}}}, {{\"all\": {{}}}}, "
                 "{\"specific\": {\"versions\": [V, ...]}}")
        if not isinstance(policy, dict) or len(policy) != 1:
            raise PolicyError(usage)
        (kind, body), = policy.items()
        if not isinstance(body, dict):
            raise PolicyError(usage)
        if kind == "latest" and set(body) <= {"num_versions"}:
            count = body.get("num_versions", 1)
            if isinstance(count, int) and not isinstance(count, bool):
                return cls._checked("latest", count=count)
        elif kind == "all" and not body:
            return cls("all")
        elif kind == "specific" and set(body) == {"versions"}:
            versions = body["versions"]
            if isinstance(versions, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in versions):
                return cls._checked("specific", versions=tuple(versions))
        raise PolicyError(usage)

    @classmethod
    def _checked(cls, kind: Literal["latest", "specific"], count: int = 1,
                 versions: tuple[int, ...] = ()) -> VersionPolicy:
        if kind == "latest" and not 1 <= count <= MAX_VERSIONS:
            raise PolicyError(f"version policy latest:{count}: serve 1 to {MAX_VERSIONS} of the newest versions")
        if kind == "specific" and not (0 < len(versions) <= MAX_VERSIONS and all(v >= 1 for v in versions)):
            raise PolicyError(f"version policy specific: name 1 to {MAX_VERSIONS} versions, each 1 or more")
        return cls(kind, count, tuple(sorted(set(versions))))


LATEST = VersionPolicy()
