"""Device health and device tuning across nodes: a host on node A sees, tunes and resyncs a
listener on node B, and every node's lead covers B's Bluetooth offset."""

from __future__ import annotations

import trio

from tests.cluster.conftest import Cluster, connect
from tests.conftest import Peer

# A node shares its devices at most once a second; allow for a loaded machine.
HEALTH_WITHIN = 10.0
BLUETOOTH_MS = 400.0


async def report(peer: Peer, drift_ms: float, latency_offset_ms: float = 0.0) -> None:
    await peer.send(
        "report",
        drift_ms=drift_ms,
        rtt_ms=20.0,
        engine="webaudio",
        browser="Firefox",
        latency_offset_ms=latency_offset_ms,
    )


async def test_a_host_on_one_node_sees_and_tunes_a_listener_on_another(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    async with connect(a, name="host") as host, connect(b, name="speaker") as lis:
        await host.expect_presence(lambda m: any(p["name"] == "speaker" for p in m["joined"]))
        await report(host, 0.5)
        await report(lis, -7.25, BLUETOOTH_MS)
        with trio.fail_after(HEALTH_WITHIN):
            while True:
                frame = await host.expect("health")
                rows = {row["id"]: row for row in frame["devices"]}
                if lis.id in rows and host.id in rows:
                    break
        row = rows[lis.id]
        assert (row["name"], row["drift_ms"], row["browser"]) == ("speaker", -7.25, "Firefox")
        assert row["latency_offset_ms"] == BLUETOOTH_MS
        summary = frame["summary"]
        assert (summary["devices"], summary["reporting"], summary["playing"]) == (2, 2, 2)
        assert summary["worst_abs_drift_ms"] == 7.25
        assert summary["p50_abs_drift_ms"] == 0.5 and summary["p95_abs_drift_ms"] == 7.25

        # The speaker's offset is in the shared value: a node it is not on leads by it.
        with trio.fail_after(HEALTH_WITHIN):
            while True:
                async with connect(a, name="probe") as probe:
                    if probe.welcome["lead_ms"] >= BLUETOOTH_MS:
                        break
                await trio.sleep(0.1)

        # Replies to a device on another node cross without a commit.
        await host.send("set_latency_offset", id=lis.id, offset_ms=150)
        assert (await lis.expect("latency_offset"))["offset_ms"] == 150
        await host.send("resync", id=lis.id)
        await lis.expect("resync")
