"""A refresh from storage that requests start when it is due and never block the event loop on:
API keys (`auth.ReloadingKeys`) and the edge's adapter listing (`edge.AdapterListing`)."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Optional


class DueRefresh:
    """Runs `refresh` at most every `every_s`, once at a time: the first request that finds it due
    starts it as a task (the refresh itself puts its blocking calls in a thread), and every request
    meanwhile waits for that one task up to its own bound, then goes on with what it has."""

    def __init__(self, refresh: Callable[[], Awaitable[None]], every_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.refresh, self.every_s, self.clock = refresh, every_s, clock
        self.due = clock()
        self.task: Optional[asyncio.Future] = None

    async def wait(self, wait_s: float) -> bool:
        """Refresh if due, waiting up to `wait_s`; False when it is still running after that."""
        if self.clock() < self.due:
            return True
        loop = asyncio.get_running_loop()
        if self.task is None or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._run())
        try:
            await asyncio.wait_for(asyncio.shield(self.task), wait_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def _run(self) -> None:
        try:
            await self.refresh()
        finally:
            self.due, self.task = self.clock() + self.every_s, None
