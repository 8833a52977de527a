"""Device health across nodes (sans-IO): each node's digest, and the merged frame."""

from __future__ import annotations

import json
import math
import random

from musicsync.health import (
    DRIFT_SAMPLE,
    HEALTH_PERIOD_MS,
    MAX_ROWS,
    STALE_MS,
    Device,
    RoomHealth,
)
from musicsync.protocol import Report

T0 = 1_700_000_000_000.0


def device(pid: str, at: float, drift: float | None) -> Device:
    return Device.from_report(pid, f"name-{pid}", Report(drift_ms=drift, rtt_ms=10.0), at)


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def node_with(drifts: dict[str, float | None], at: float = T0) -> RoomHealth:
    health = RoomHealth()
    for pid, drift in drifts.items():
        health.report(device(pid, at, drift))
    return health


def test_a_digest_is_bounded_and_only_made_when_the_nodes_own_devices_reported() -> None:
    rng = random.Random(3)
    b = node_with({f"b{i}": rng.uniform(-40, 40) for i in range(5_000)})
    polled = b.poll_cluster(T0 + 10, participants=5_001, seated=5_000)
    assert polled is not None
    digest, _ = polled
    assert digest is not None
    assert len(digest["rows"]) == MAX_ROWS and len(digest["sample"]) == DRIFT_SAMPLE
    assert (digest["known"], digest["seated"], digest["playing"]) == (5_000, 5_000, 5_000)
    assert len(json.dumps(digest)) < 16_000  # a room of 5 000: one small message a second
    b.note_remote("a", digest)  # only another node's digest came in since: a frame, no digest
    polled = b.poll_cluster(T0 + 10 + HEALTH_PERIOD_MS, participants=5_001, seated=5_000)
    assert polled is not None and polled[0] is None


def test_the_merged_frame_has_everyones_worst_rows_counts_and_percentiles() -> None:
    host_node = node_with({"h": 0.5, "c": None})  # a co-host not playing
    speaker_node = node_with({f"l{i}": float(i) for i in range(30)})
    digest = speaker_node.poll_cluster(T0 + 200, participants=32, seated=30)
    assert digest is not None and digest[0] is not None
    assert host_node.note_remote("B", digest[0])
    polled = host_node.poll_cluster(T0 + 700, participants=32, seated=2)
    assert polled is not None
    payload = polled[1]
    ids = [row["id"] for row in payload["devices"]]
    assert ids[:3] == ["l29", "l28", "l27"]  # the worst |drift| first, whichever node
    assert set(ids) == {"h", "c", *(f"l{i}" for i in range(30))}
    by_id = {row["id"]: row for row in payload["devices"]}
    assert by_id["l0"]["age_ms"] == 700  # aged by the time since its digest was made
    summary = payload["summary"]
    assert (summary["devices"], summary["reporting"], summary["playing"]) == (32, 32, 31)
    every = [0.5, *(float(i) for i in range(30))]
    assert summary["p50_abs_drift_ms"] == exact_percentile(every, 0.5)  # exact: small nodes
    assert summary["p95_abs_drift_ms"] == exact_percentile(every, 0.95)
    assert summary["worst_abs_drift_ms"] == 29.0


def test_big_nodes_merge_to_percentiles_within_the_samples_resolution() -> None:
    rng = random.Random(7)
    nodes = {n: {f"{n}{i}": rng.expovariate(1 / 5) for i in range(3_000)} for n in "ABC"}
    host_node = node_with(nodes["A"])
    for n in "BC":
        polled = node_with(nodes[n]).poll_cluster(T0, participants=9_000, seated=3_000)
        assert polled is not None and polled[0] is not None
        host_node.note_remote(n, polled[0])
    polled = host_node.poll_cluster(T0, participants=9_000, seated=3_000)
    assert polled is not None
    summary = polled[1]["summary"]
    every = sorted(abs(x) for drifts in nodes.values() for x in drifts.values())
    for q, key in ((0.5, "p50_abs_drift_ms"), (0.95, "p95_abs_drift_ms")):
        lo = every[max(0, int((q - 1.5 / DRIFT_SAMPLE) * len(every)))]
        hi = every[min(len(every) - 1, int((q + 1.5 / DRIFT_SAMPLE) * len(every)))]
        assert lo <= summary[key] <= hi, (key, summary[key], lo, hi)
    assert summary["worst_abs_drift_ms"] == round(every[-1], 2)
    assert summary["devices"] == 9_000 and summary["reporting"] == 9_000
    assert len(polled[1]["devices"]) == MAX_ROWS


def test_a_silent_nodes_digest_is_dropped_and_a_bad_one_refused() -> None:
    host_node = node_with({"h": 1.0})
    other = node_with({"x": 2.0})
    polled = other.poll_cluster(T0, participants=2, seated=1)
    assert polled is not None and polled[0] is not None
    assert host_node.note_remote("B", polled[0])
    assert not host_node.note_remote("C", {"rows": "nope"})
    assert not host_node.note_remote("C", {**polled[0], "sample": ["x"]})
    host_node.report(device("h", T0 + STALE_MS + 1, 1.0))
    later = host_node.poll_cluster(T0 + STALE_MS + 1, participants=2, seated=1)
    assert later is not None
    assert [row["id"] for row in later[1]["devices"]] == ["h"]
