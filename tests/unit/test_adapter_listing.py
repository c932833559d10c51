"""The edge's listing of on-demand adapters (serve.adapters_path): off the event loop, and a
listing that fails keeps the last good set (issue 34, item 6)."""

from __future__ import annotations

import asyncio
import logging
import threading

from raylm import storage
from raylm.config import ServeConfig
from raylm.errors import StorageError
from raylm.serve.edge import AdapterListing


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def listing(tmp_path, clock) -> AdapterListing:
    return AdapterListing(ServeConfig(model_id="tiny", adapters_path=str(tmp_path)), clock=clock)


def names(adapters: AdapterListing) -> tuple[str, ...]:
    return asyncio.run(adapters.names())


def test_a_failing_listing_keeps_the_last_good_set_and_says_so_once(tmp_path, monkeypatch, caplog):
    (tmp_path / "a").mkdir()
    clock = Clock()
    adapters = listing(tmp_path, clock)
    assert names(adapters) == ("tiny:a",)
    (tmp_path / "b").mkdir()
    assert names(adapters) == ("tiny:a",)  # not due yet
    calls = []

    def unreachable(uri):
        calls.append(uri)
        raise StorageError(f"{uri}: cannot list it: connection refused")

    monkeypatch.setattr(storage, "list_dir", unreachable)
    caplog.set_level(logging.WARNING, logger="raylm.serve.edge")
    for _ in range(3):  # three listings due, all failing: the last good set, one warning
        clock.now += AdapterListing.LIST_TTL_S
        assert names(adapters) == ("tiny:a",)
    assert len(calls) == 3
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "cannot list it" in warnings[0] and "last good set of 1 adapter" in warnings[0]
    monkeypatch.undo()
    clock.now += AdapterListing.LIST_TTL_S
    assert names(adapters) == ("tiny:a", "tiny:b")
    assert "listed again (2 adapter(s))" in caplog.records[-1].getMessage()


def test_a_listing_that_fails_from_the_start_lists_nothing_until_it_works(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    clock = Clock()
    adapters = listing(tmp_path, clock)
    monkeypatch.setattr(storage, "kind", lambda uri: (_ for _ in ()).throw(OSError("no credentials")))
    assert names(adapters) == ()
    monkeypatch.undo()
    clock.now += AdapterListing.LIST_TTL_S
    assert names(adapters) == ("tiny:a",)


def test_the_listing_runs_off_the_event_loop(tmp_path, monkeypatch):
    """A listing that hangs blocks neither the loop nor, past max_wait_s, the request."""
    (tmp_path / "a").mkdir()
    clock = Clock()
    adapters = listing(tmp_path, clock)
    adapters.max_wait_s = 0.05
    assert names(adapters) == ("tiny:a",)
    release, threads = threading.Event(), []
    real = storage.list_dir

    def slow(uri):
        threads.append(threading.get_ident())
        release.wait(10)
        return real(uri) + ["b"]

    monkeypatch.setattr(storage, "list_dir", slow)

    async def run():
        loop_thread = threading.get_ident()
        clock.now += AdapterListing.LIST_TTL_S
        ticks = 0

        async def tick():
            nonlocal ticks
            for _ in range(5):
                await asyncio.sleep(0.005)
                ticks += 1

        first, _ = await asyncio.gather(adapters.names(), tick())
        assert first == ("tiny:a",) and ticks == 5  # the loop ran meanwhile; the request went on with the last set
        assert threads and threads[0] != loop_thread
        again = await adapters.names()  # the same listing still under way: not a second one
        assert again == ("tiny:a",) and len(threads) == 1
        release.set()
        await asyncio.wait_for(asyncio.shield(adapters._refresh.task), 5)
        assert await adapters.names() == ("tiny:a", "tiny:b")

    asyncio.run(run())
