"""When the cyclic garbage collector may pause a serving process, and for how long.

Every connection keeps ~150 objects the collector tracks (tasks, coroutine
frames, parser state). With 10 000 listeners a full collection walks ~1.5 M of
them and stops the event loop for 100-300 ms; CPython starts one whenever the
long-lived objects have grown by a quarter, so a room that is filling or busy
gets them mid-broadcast (the bench's p99 at 5 000 listeners: 280 ms against a
50 ms median). The steward moves what has survived into the permanent
generation every few seconds (``gc.freeze``: no walk, no pause), so the
collector only ever walks what is young; once in a long while it thaws and
collects everything, so cycles among objects that died after being frozen are
not kept for long.

Only ``musicsync serve`` runs it (the process is ours); the test suite runs
servers inside pytest's process and keeps Python's defaults.
"""

from __future__ import annotations

import gc
import logging
import time

import trio

log = logging.getLogger(__name__)

FREEZE_PERIOD = 1.0  # seconds between freezes of what has survived so far
THAW_PERIOD = 15 * 60.0  # seconds between full collections of everything


async def steward_gc(
    freeze_period: float = FREEZE_PERIOD, thaw_period: float = THAW_PERIOD
) -> None:
    """Freeze survivors every ``freeze_period``; thaw and collect every ``thaw_period``."""
    thaw_at = trio.current_time() + thaw_period
    while True:
        await trio.sleep(freeze_period)
        if trio.current_time() >= thaw_at:
            thaw_at = trio.current_time() + thaw_period
            started = time.perf_counter()
            gc.unfreeze()
            found = gc.collect()
            log.info(
                "full garbage collection",
                extra={"ms": round((time.perf_counter() - started) * 1000, 1), "found": found},
            )
        gc.freeze()
