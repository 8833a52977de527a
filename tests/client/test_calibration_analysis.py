"""The page's calibration analysis, run in Node on synthetic recordings.

``calibration_sim.mjs`` cuts the "calibration analysis" section out of
``static/index.html`` and hands it recordings in which each device's chirp
arrives at a known delay (off the sample grid, on a microphone clock 40 ppm
fast): the matched filter must find every delay to a small fraction of a
sample, reject what it cannot trust (a device that never played, a reflection
as strong as the sound, rounds the microphone missed, a round far from the
others) and say why, and propose offsets relative to the device heard first.
"""

from __future__ import annotations

from typing import Any

import pytest

from .pagesim import needs_node, run_page_sim

pytestmark = needs_node

TOLERANCE_MS = 0.05  # 2.4 samples at 48 kHz: the peak is interpolated between samples


def simulate(scenario: str) -> dict[str, Any]:
    return run_page_sim("calibration_sim.mjs", scenario, timeout=120)


def by_id(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in result["measured"]}


def test_known_delays_are_found_and_a_silent_device_is_rejected() -> None:
    r = simulate("delays")
    m = by_id(r)
    for pid, truth in r["truth"].items():
        assert m[pid]["delay_ms"] == pytest.approx(truth, abs=TOLERANCE_MS), m[pid]
        assert m[pid]["rounds"] == 3 and m[pid]["spread_ms"] < TOLERANCE_MS
        assert m[pid]["reason"] is None
    assert m["d"]["delay_ms"] is None and m["d"]["rounds"] == 0
    assert m["d"]["reason"].startswith("0 of 3 rounds heard (round 1: no clear peak")
    # proposals, to a tenth of a ms: a was heard first and keeps 0; b (already at
    # 10) gets 10 + 40.04; c is 200.41 ms late
    rows = {row["id"]: row for row in r["proposal"]["rows"]}
    assert r["proposal"]["reference"] == "a"
    assert rows["a"]["proposed"] == 0
    assert rows["b"]["proposed"] == 50.0 and rows["b"]["late"] == pytest.approx(40.04, abs=0.05)
    assert rows["c"]["proposed"] == 200.4
    assert rows["d"]["ok"] is False and "no clear peak" in rows["d"]["reason"]
    # the recording's clock: a least-squares line through (context time, server time)
    assert r["line"]["msPerSecond"] == pytest.approx(1000.04)


def test_a_reflection_as_strong_as_the_sound_is_ambiguous() -> None:
    m = by_id(simulate("echo"))
    assert m["b"]["delay_ms"] is None
    assert "two peaks close in height (0.90 of the peak, 25.0 ms apart)" in m["b"]["reason"]
    assert m["a"]["delay_ms"] == pytest.approx(12.3, abs=TOLERANCE_MS)


def test_rounds_the_microphone_missed_are_named_and_the_rest_count() -> None:
    m = by_id(simulate("late"))
    for pid, truth in (("a", 12.3), ("b", 52.34), ("c", 212.71)):
        assert m[pid]["delay_ms"] == pytest.approx(truth, abs=TOLERANCE_MS)
        assert m[pid]["rounds"] == 2 and m[pid]["reason"] == "round 1: not recorded"


def test_a_round_far_from_the_others_is_dropped() -> None:
    m = by_id(simulate("outlier"))
    assert m["c"]["delay_ms"] == pytest.approx(212.71, abs=TOLERANCE_MS)
    assert m["c"]["rounds"] == 2
    assert m["c"]["reason"] == "round 2: 15.0 ms off the other rounds"


def test_chirps_under_the_noise_are_still_found() -> None:
    r = simulate("noisy")
    m = by_id(r)
    for pid, truth in r["truth"].items():
        assert m[pid]["delay_ms"] == pytest.approx(truth, abs=0.2), m[pid]
    assert m["d"]["delay_ms"] is None
