"""The server clock follows a monotonic source anchored once to the wall clock."""

from __future__ import annotations

import time

import pytest

from musicsync.clock import ServerClock


class FakeMonotonic:
    def __init__(self, start: float = 500.0) -> None:
        self.value = start
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_starts_at_the_given_wall_time() -> None:
    mono = FakeMonotonic()
    clock = ServerClock(mono, wall_ms=1_700_000_000_000.0)
    assert clock.now_ms() == 1_700_000_000_000.0


def test_advances_with_the_monotonic_source() -> None:
    mono = FakeMonotonic(123.0)
    clock = ServerClock(mono, wall_ms=1_000_000.0)
    mono.value += 1.5
    assert clock.now_ms() == 1_001_500.0
    mono.value += 0.001
    assert clock.now_ms() == pytest.approx(1_001_501.0)
    mono.value += 3600.0
    assert clock.now_ms() == pytest.approx(1_000_000.0 + 3_601_501.0)


def test_does_not_move_while_the_monotonic_source_stands_still() -> None:
    mono = FakeMonotonic()
    clock = ServerClock(mono, wall_ms=42_000.0)
    assert [clock.now_ms() for _ in range(5)] == [42_000.0] * 5


def test_reads_the_wall_clock_once_and_ignores_later_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wall = [1_700_000_000.0]  # seconds, as time.time() returns them
    reads: list[float] = []

    def fake_time() -> float:
        reads.append(wall[0])
        return wall[0]

    monkeypatch.setattr(time, "time", fake_time)
    mono = FakeMonotonic(10.0)
    clock = ServerClock(mono)
    assert clock.now_ms() == 1_700_000_000_000.0
    # An NTP step or a manual date change: the server clock does not jump.
    wall[0] += 3600.0
    assert clock.now_ms() == 1_700_000_000_000.0
    wall[0] -= 86_400.0
    mono.value += 2.0
    assert clock.now_ms() == 1_700_000_002_000.0
    assert len(reads) == 1


def test_explicit_wall_time_does_not_read_the_wall_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forbidden() -> float:
        raise AssertionError("time.time() must not be called")

    monkeypatch.setattr(time, "time", forbidden)
    clock = ServerClock(FakeMonotonic(), wall_ms=5.0)
    assert clock.now_ms() == 5.0


def test_from_monotonic_converts_readings() -> None:
    mono = FakeMonotonic(100.0)
    clock = ServerClock(mono, wall_ms=1_000_000.0)
    assert clock.from_monotonic(100.0) == 1_000_000.0
    assert clock.from_monotonic(102.25) == 1_002_250.0
    assert clock.from_monotonic(99.0) == 999_000.0
    mono.value = 200.0
    assert clock.from_monotonic(200.0) == clock.now_ms()


def test_default_clock_is_close_to_the_wall_clock_and_monotonic() -> None:
    clock = ServerClock()
    first = clock.now_ms()
    assert abs(first - time.time() * 1000.0) < 5_000.0
    assert clock.now_ms() >= first
