"""Room cost: Python memory per sans-IO ``Room`` (tracemalloc), for the shapes a server holds most.

The hub keeps one ``Room`` per room it knows, and a server may know thousands
(``--max-rooms``), most of them empty or nearly so. This measures what one
costs, in bytes traced by ``tracemalloc``, for ``--rooms`` rooms of each shape:

* ``new``: ``Room(name)``, as the hub makes it for a first visitor;
* ``restored``: a persisted room brought back at start (a track, a host seat
  held for its resume grace), then polled past the grace: empty, persisted;
* ``host+listener``: a new room with a host and a listener seated, presence
  flushed.

Prints a table, then one JSON line with every figure. ``--source DIR`` imports
``musicsync`` from another checkout (e.g. a ``git archive`` of a commit) to
compare.

    python benchmarks/bench_room_cost.py [--rooms 2000] [--source DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOMS = 2000
T0 = 1_800_000_000_000.0
AFTER_GRACE_MS = 120_000.0
PRESENCE_FLUSH_MS = 5_000.0


def measure(make: Callable[[int], Any], rooms: int) -> float:
    """Bytes per room still allocated once ``rooms`` rooms are made (and kept)."""
    gc.collect()
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    kept = [make(i) for i in range(rooms)]
    gc.collect()
    now, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(kept) == rooms
    return (now - base) / rooms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rooms", type=int, default=ROOMS)
    parser.add_argument("--source", type=Path, help="import musicsync from this checkout")
    args = parser.parse_args()
    source = args.source or Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(source.resolve()))
    from musicsync.protocol import SetTrack
    from musicsync.room import Room

    template = Room("template")
    template.join("h", "Host", T0, token="tok-h")
    template.handle("h", SetTrack(url="/media/a.mp3", title="A", duration=180.0), T0)
    snap = json.loads(json.dumps(template.snapshot()))

    def new(i: int) -> Any:
        return Room(f"room{i}")

    def restored(i: int) -> Any:
        room = Room.restore(f"room{i}", json.loads(json.dumps(snap)), T0)
        room.poll(T0 + AFTER_GRACE_MS)
        return room

    def pair(i: int) -> Any:
        room = Room(f"room{i}")
        room.join("h", "Host", T0, token=f"tok-h{i}")
        room.join("l", "Listener", T0, token=f"tok-l{i}")
        room.poll(T0 + PRESENCE_FLUSH_MS)
        return room

    figures = {
        "new": measure(new, args.rooms),
        "restored": measure(restored, args.rooms),
        "host+listener": measure(pair, args.rooms),
    }
    print(f"bytes per room ({args.rooms} rooms each, tracemalloc):")
    for shape, per_room in figures.items():
        print(f"  {shape:<14} {per_room:8.0f}")
    print(json.dumps({"rooms": args.rooms, "bytes_per_room": figures}))


if __name__ == "__main__":
    main()
