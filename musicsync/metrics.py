"""Prometheus metrics of one server: its own registry, so several can share a process.

Counters the hub keeps anyway (connections, messages, errors, closes) are read
at scrape time by a collector, so the hot path pays nothing for them. Only the
histograms are observed as things happen: broadcast latency in the writer, and
the drift and round trip that clients report.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__

if TYPE_CHECKING:
    from .hub import Hub

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAMESPACE = "musicsync"
ENGINES = ("webaudio", "element")

# Seconds from a state broadcast in the hub to the writer handing it to the socket.
BROADCAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
# |drift| between a client's playback and the room timeline, in seconds.
DRIFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0)
RTT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class SyncReport(Protocol):
    @property
    def drift_ms(self) -> float | None: ...
    @property
    def rtt_ms(self) -> float: ...
    @property
    def engine(self) -> str | None: ...


class HubCollector(Collector):
    """Gauges and counters straight from the hub's own bookkeeping."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        hub, stats = self.hub, self.hub.stats
        yield GaugeMetricFamily(
            f"{NAMESPACE}_connections", "Open WebSocket connections", value=hub.connection_count
        )
        yield GaugeMetricFamily(f"{NAMESPACE}_rooms", "Rooms in memory", value=len(hub.rooms))
        yield CounterMetricFamily(
            f"{NAMESPACE}_connections_accepted",
            "WebSocket connections accepted since start",
            value=stats.connections_total,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_messages_in", "Frames received from clients", value=stats.messages_in
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_messages_out", "Frames sent to clients", value=stats.messages_out
        )
        errors = CounterMetricFamily(
            f"{NAMESPACE}_errors", "Error frames sent to clients, by code", labels=["code"]
        )
        for code, n in sorted(stats.errors.items()):
            errors.add_metric([code], n)
        yield errors
        closes = CounterMetricFamily(
            f"{NAMESPACE}_closes", "Connections the server closed, by close code", labels=["code"]
        )
        for close_code, n in sorted(stats.closes.items()):
            closes.add_metric([str(close_code)], n)
        yield closes
        yield CounterMetricFamily(
            f"{NAMESPACE}_states_coalesced",
            "States a slow client's outbox replaced by a newer one before sending",
            value=hub.coalesced_states(),
        )
        yield from self._senders()
        yield from self._writer()
        info = GaugeMetricFamily(f"{NAMESPACE}_build_info", "Version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

    def _senders(self) -> Iterator[Metric]:
        pool = self.hub.senders
        yield GaugeMetricFamily(
            f"{NAMESPACE}_sender_threads",
            "Threads sharing big rooms' broadcasts with the event loop (0: the loop alone)",
            value=pool.threads,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_shared_broadcasts",
            "Broadcasts whose sends the sender threads shared",
            value=pool.parallel_sends,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_shared_broadcast_misses",
            "Sockets in shared broadcasts that did not take the whole frame at once"
            " (their writers finished the send or queued it)",
            value=pool.parallel_misses,
        )

    def _writer(self) -> Iterator[Metric]:
        writer = self.hub.writer
        if writer is None:  # rooms in Redis (--redis): no local database writer
            return
        stats = writer.stats
        yield CounterMetricFamily(
            f"{NAMESPACE}_db_batches",
            "Batches the room writer ran (failed ones included)",
            value=stats.batches,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_db_rows",
            "Room snapshots in those batches (one per room per batch: a newer one"
            " replaces a queued one)",
            value=stats.rows,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_db_failures",
            "Batches the database refused (their rooms stay unacknowledged)",
            value=stats.failures,
        )


class Metrics:
    """The registry of one server and the histograms its edge observes."""

    def __init__(self, hub: Hub | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.broadcast_latency = Histogram(
            f"{NAMESPACE}_broadcast_latency_seconds",
            "Time from a state broadcast to its frame reaching the sockets: once per"
            " broadcast for the frames written directly (until the last of them),"
            " once per frame a slow socket's writer sent later",
            buckets=BROADCAST_BUCKETS,
            registry=self.registry,
        )
        self.drift = Histogram(
            f"{NAMESPACE}_client_drift_seconds",
            "Absolute playback drift from the room timeline, as clients report it",
            ["engine"],
            buckets=DRIFT_BUCKETS,
            registry=self.registry,
        )
        self.rtt = Histogram(
            f"{NAMESPACE}_client_rtt_seconds",
            "Round trip to the server, as clients report it",
            ["engine"],
            buckets=RTT_BUCKETS,
            registry=self.registry,
        )
        for engine in (*ENGINES, "unknown"):  # so every series exists from the start
            self.drift.labels(engine)
            self.rtt.labels(engine)
        if hub is not None:
            self.registry.register(HubCollector(hub))

    def observe_report(self, report: SyncReport) -> None:
        engine = report.engine if report.engine in ENGINES else "unknown"
        if report.drift_ms is not None:  # null while the device is not playing
            self.drift.labels(engine).observe(abs(report.drift_ms) / 1000.0)
        self.rtt.labels(engine).observe(report.rtt_ms / 1000.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
