"""The garbage-collection steward: survivors frozen often, everything collected rarely."""

from __future__ import annotations

import gc
import weakref

import trio
import trio.testing

from musicsync.gcpolicy import steward_gc


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_freezes_survivors_then_thaws_and_collects(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gc.collect()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(steward_gc, 1.0, 10.0)
            await trio.sleep(1.5)
            assert gc.get_freeze_count() > 0  # what survived is out of the collector's walk
            cycle = Cycle()
            alive = weakref.ref(cycle)
            await trio.sleep(1.0)  # frozen with everything else
            del cycle  # now garbage, but frozen: no collection finds it
            gc.collect()
            assert alive() is not None
            await trio.sleep(9.0)  # the thaw: everything collected, then frozen again
            assert alive() is None
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
