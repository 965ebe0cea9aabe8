"""The one limit on requests served at once, shared by the gRPC and HTTP ports."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.core.observer import NULL_OBSERVER, Observer
from service.errors import Overloaded


class ConcurrencyLimit:
    """RPCs being served at once; past `limit` (0: none) a new one is refused UNAVAILABLE before any work."""

    def __init__(self, limit: int = 0, observer: Observer = NULL_OBSERVER) -> None:
        self.limit, self.active, self._observer = limit, 0, observer

    @contextmanager
    def held(self) -> Iterator[None]:
        if self.limit and self.active >= self.limit:
            self._observer.observe_refusal("", "", "concurrency")
            raise Overloaded(f"the server is serving its limit of {self.limit} concurrent requests: retry later or "
                             "on another replica")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


UNLIMITED = ConcurrencyLimit()
