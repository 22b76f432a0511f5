"""Back-pressure of a server replica: how many segment requests it holds, and a JSON 503 beyond that.

Ray Serve's own queue limit (``max_queued_requests``) answers a plain-text 503 from the proxy; the issue wants
every error as JSON. So a replica admits requests itself: at most ``working`` are read, decoded and batched at
once, at most ``waiting`` more wait for a turn, and the next one is refused at once (before its body is read),
which costs the server nearly nothing and keeps it healthy.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

RETRY_AFTER_S = 1  # what the 503 answer's Retry-After header suggests


class Overloaded(Exception):
    """The replica holds as many requests as it may (HTTP 503); ``detail`` says how many."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class Admission:
    """Admission of one replica's requests (used from its event loop only).

    ``working``: requests served at once (>= the batch size); ``waiting``: requests held beyond those, or None
    for no limit. ``admit()`` is an async context manager that raises :class:`Overloaded` when full.
    """

    def __init__(self, working: int, waiting: int | None) -> None:
        if working < 1 or (waiting is not None and waiting < 0):
            raise ValueError(f"admission needs working >= 1 and waiting >= 0 (or None), got {working}, {waiting}")
        self.working, self.waiting = working, waiting
        self.held = 0
        self.refused = 0
        self._turns = asyncio.Semaphore(working)

    @property
    def capacity(self) -> int | None:
        """Requests held at most (working + waiting), None without a limit."""
        return None if self.waiting is None else self.working + self.waiting

    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Hold one request for the block: refused at once when full, else waits for a working turn."""
        if self.capacity is not None and self.held >= self.capacity:
            self.refused += 1
            raise Overloaded(f"the replica holds {self.held} requests ({self.working} in work, {self.waiting} "
                             f"waiting), its limit; retry in about {RETRY_AFTER_S} s")
        self.held += 1
        try:
            async with self._turns:
                yield
        finally:
            self.held -= 1

    def state(self) -> dict[str, int | None]:
        """What ``/healthz`` reports: requests held now, the limits, and how many were refused."""
        return {"held": self.held, "working": self.working, "waiting": self.waiting, "refused": self.refused}
