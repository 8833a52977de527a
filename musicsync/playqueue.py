"""A room's queue: the tracks that follow, repeat and shuffle, which comes next and when (sans-IO).

Invariants (tests/test_playqueue.py, tests/test_room_properties.py):

* At most MAX_QUEUE_ITEMS items; item ids are ``q<n>`` with ``n`` from a
  counter that only grows, so an id is never reused, not even after a restart.
* ``rev`` grows exactly when the list of item ids differs from the one the
  last broadcast carried (``note_broadcast``), so a client holding revision
  ``rev`` holds this queue.
* ``repeat`` is one of REPEAT_MODES. With repeat "all" the track that ends
  goes back to the end of the queue; with "one" it plays again unless skipped;
  with shuffle the next one is drawn at random (never the one just played
  when another is there).
* A refused operation (unknown item, full queue) raises ``Refusal`` and
  changes nothing; a no-op returns False; a change returns True.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .effects import Refusal
from .timeline import MS_PER_SECOND, Track

MAX_QUEUE_ITEMS = 500
# The state that switches to the next queued track goes out this long before
# the current one ends, so every client has it (and the track) in time.
ADVANCE_NOTICE_MS = 4000.0
# Tracks shorter than this never advance the queue by themselves (queue_next does).
MIN_ADVANCE_SECONDS = 0.5
REPEAT_MODES = ("off", "one", "all")
# Who "added" a track that repeat "all" put back at the end.
REPEAT_ADDER = "repeat"


@dataclass(frozen=True, slots=True)
class QueueItem:
    id: str
    track: Track
    added_by: str

    def to_wire(self) -> dict[str, Any]:
        return {"id": self.id, **self.track.to_wire(), "added_by": self.added_by}

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> QueueItem:
        return cls(d["id"], Track.from_wire(d), d["added_by"])


@dataclass(slots=True)
class PlayQueue:
    """The queue part of a room."""

    items: list[QueueItem] = field(default_factory=list)
    repeat: str = "off"  # one of REPEAT_MODES
    shuffle: bool = False
    seq: int = 0  # the last item id's number
    # Which queue the last broadcast carried (not persisted: a fan-out cache key).
    rev: int = 0
    _broadcast_ids: tuple[str, ...] = ()

    # -- queries ---------------------------------------------------------------

    def wire(self) -> list[dict[str, Any]]:
        return [item.to_wire() for item in self.items]

    def has_follower(self, current: Track | None) -> bool:
        """Whether something plays after ``current`` ends (or is skipped)."""
        return bool(self.items) or (self.repeat == "all" and current is not None)

    def advance_due_at(self, end: float, duration: float) -> float:
        """When the room must announce what follows a track of ``duration`` s ending at ``end``."""
        if self.items or self.repeat != "off":
            # A short track is announced half-way through, so that each advance
            # lands in the future and a tiny looping track cannot spin the timer.
            half = duration * MS_PER_SECOND / 2
            return end - min(ADVANCE_NOTICE_MS, half)
        return end  # nothing follows: settle into "paused at the end" then

    def _index(self, item_id: str) -> int:
        index = next((i for i, item in enumerate(self.items) if item.id == item_id), None)
        if index is None:
            raise Refusal("no_such_item", "no queue item with that id")
        return index

    # -- transitions -------------------------------------------------------------

    def add(self, track: Track, added_by: str, *, front: bool = False) -> QueueItem:
        if len(self.items) >= MAX_QUEUE_ITEMS:
            raise Refusal("queue_full", f"the queue holds {MAX_QUEUE_ITEMS} tracks")
        item = self._new_item(track, added_by)
        if front:
            self.items.insert(0, item)
        else:
            self.items.append(item)
        return item

    def _new_item(self, track: Track, added_by: str) -> QueueItem:
        self.seq += 1
        return QueueItem(f"q{self.seq}", track, added_by)

    def remove(self, item_id: str) -> bool:
        del self.items[self._index(item_id)]
        return True

    def move(self, item_id: str, to: int) -> bool:
        item = self.items.pop(self._index(item_id))
        self.items.insert(min(to, len(self.items)), item)
        return True

    def set_mode(self, repeat: str | None, shuffle: bool | None) -> bool:
        repeat = self.repeat if repeat is None else repeat
        shuffle = self.shuffle if shuffle is None else shuffle
        if repeat not in REPEAT_MODES:
            raise ValueError(f"repeat must be one of {REPEAT_MODES}, not {repeat!r}")
        if (repeat, shuffle) == (self.repeat, self.shuffle):
            return False
        self.repeat, self.shuffle = repeat, shuffle
        return True

    def pick_next(
        self, current: Track | None, rng: random.Random, *, skipping: bool
    ) -> Track | None:
        """Take the track that follows ``current``, honouring repeat and shuffle."""
        if self.repeat == "one" and current is not None and not skipping:
            return current
        if self.repeat == "all" and current is not None:
            self.items.append(self._new_item(current, REPEAT_ADDER))
        if not self.items:
            return None
        index = rng.randrange(len(self.items)) if self.shuffle else 0
        if self.repeat == "all" and self.shuffle and len(self.items) > 1:
            index = rng.randrange(len(self.items) - 1)  # not the one just played
        return self.items.pop(index).track

    def note_broadcast(self) -> int:
        """The revision of the queue a broadcast about to go out carries."""
        ids = tuple(item.id for item in self.items)  # ids are never reused
        if ids != self._broadcast_ids:
            self._broadcast_ids = ids
            self.rev += 1
        return self.rev

    def adopt_rev(self, rev: int) -> None:
        """Take ``rev`` as the revision of the queue as it is now (shared by every node)."""
        self.rev = rev
        self._broadcast_ids = tuple(item.id for item in self.items)

    # -- the database -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.wire(),
            "repeat": self.repeat,
            "shuffle": self.shuffle,
            "seq": self.seq,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PlayQueue:
        repeat = d.get("repeat", "off")
        if repeat not in REPEAT_MODES:
            raise ValueError(f"unknown repeat mode {repeat!r}")
        return cls(
            items=[QueueItem.from_wire(q) for q in d.get("items", [])],
            repeat=repeat,
            shuffle=bool(d.get("shuffle", False)),
            seq=int(d.get("seq", 0)),
        )
