"""The pure parts of the Redis cluster: URLs, revisions, messages and the shared room value."""

from __future__ import annotations

import json
import random

import pytest

from musicsync.clusterproto import (
    GAP,
    NEXT,
    STALE,
    BadValue,
    Keys,
    capture,
    connected_elsewhere,
    copy_news,
    decode_message,
    decode_value,
    effects_from_wire,
    effects_to_wire,
    encode_closed,
    encode_commit,
    encode_effects,
    encode_health,
    encode_value,
    for_other_nodes,
    lease_epoch,
    live_elsewhere,
    live_on,
    message_head,
    nodes_in,
    order,
    replica,
    shared_offset,
    unseen_elsewhere,
)
from musicsync.config import ConfigError, parse_redis_url, redis_url_for_humans, resolve_settings
from musicsync.effects import Disconnect
from musicsync.protocol import QueueAdd, SetTrack, TransferHost, Volume
from musicsync.room import (
    PARTICIPANT_LIST_MAX,
    BroadcastPresence,
    BroadcastState,
    Effect,
    Error,
    Reply,
    Room,
)

T0 = 1_700_000_000_000.0
GRACE = 30_000.0


@pytest.mark.parametrize(
    "url",
    ["redis://127.0.0.1:6379/0", "redis://cache", "rediss://u:p@h.example:6380/15", " redis://h "],
)
def test_good_redis_urls(url: str) -> None:
    assert parse_redis_url(url) == url.strip()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://h:6379", "redis://"),
        ("redis://", "no host"),
        ("redis://h:0", "port 0"),
        ("redis://h:70000", "Port out of range"),
        ("redis://h/16", "0 to 15"),
        ("redis://h/x", "0 to 15"),
        ("redis://h/0?db=1", "query"),
    ],
)
def test_bad_redis_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_redis_url(url)


def test_redis_url_from_env_and_file(tmp_path: object) -> None:
    settings = resolve_settings({}, {"MUSICSYNC_REDIS": "redis://h:1/2"})
    assert settings.redis == "redis://h:1/2"
    with pytest.raises(ConfigError, match="MUSICSYNC_REDIS"):
        resolve_settings({}, {"MUSICSYNC_REDIS": "nope"})
    assert resolve_settings({}, {}).redis is None


def test_passwords_stay_out_of_messages() -> None:
    assert redis_url_for_humans("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redis_url_for_humans("redis://me:s3cret@h/0") == "redis://me:***@h/0"
    assert redis_url_for_humans("redis://h/0") == "redis://h/0"


def test_keys_share_one_prefix() -> None:
    keys = Keys("ms")
    assert [keys.room("a"), keys.lease("a"), keys.epoch("a"), keys.node("n1"), keys.channel] == [
        "ms:room:a",
        "ms:lease:a",
        "ms:epoch:a",
        "ms:node:n1",
        "ms:changes",
    ]


def test_lease_tokens_carry_their_epoch() -> None:
    assert lease_epoch("node-a:17") == 17
    with pytest.raises(BadValue):
        lease_epoch("garbage")


def test_revision_order() -> None:
    assert order(5, 4) == order(5, 5) == STALE
    assert order(5, 6) == NEXT
    assert order(5, 8) == GAP


EFFECTS: list[Effect] = [
    BroadcastState({"version": 3, "queue": []}, 2),
    BroadcastPresence({"joined": [], "left": ["x"], "changed": [], "count": 1}),
    Reply("p1", "kicked", {}),
    Error("p2", "not_host", "only the host"),
    Disconnect("p3", "kicked", "the host removed you", 4403),
]


def test_effects_survive_the_wire() -> None:
    assert effects_from_wire(json.loads(json.dumps(effects_to_wire(EFFECTS)))) == EFFECTS
    with pytest.raises(BadValue):
        effects_from_wire([{"t": "teleport"}])
    with pytest.raises(BadValue):
        effects_from_wire([{"t": "state"}])


def test_other_nodes_get_broadcasts_and_what_is_addressed_to_their_clients() -> None:
    assert for_other_nodes(EFFECTS, {"p1"}) == [EFFECTS[0], EFFECTS[1], EFFECTS[3], EFFECTS[4]]
    assert for_other_nodes(EFFECTS, {"p1", "p2", "p3"}) == EFFECTS[:2]


def test_messages_round_trip() -> None:
    value = {"snap": {"state": {}}, "live": {"a": "n1"}}
    text = encode_commit("main", "n1", 7, EFFECTS, encode_value(value))
    msg = decode_message(text)
    assert (msg.room, msg.node, msg.rev) == ("main", "n1", 7)
    assert (msg.effects, msg.value) == (EFFECTS, value)
    assert text.startswith('{"room":"main"')  # the edge reads the room from the head
    news = decode_message(encode_effects("main", "n2", EFFECTS[1:2]))
    assert news.rev is None and news.value is None and news.effects == EFFECTS[1:2]
    assert decode_message(encode_closed("main", "n3")).closed
    for bad in ("{", "[]", '{"room": "x"}', '{"room":"x","node":"n","rev":"z","fx":[]}'):
        with pytest.raises(BadValue):
            decode_message(bad)


def test_values_must_hold_a_snapshot() -> None:
    with pytest.raises(BadValue):
        decode_value("[1]")
    with pytest.raises(BadValue):
        decode_value("{")
    assert decode_value('{"snap": {}}') == {"snap": {}}


def busy_room() -> Room:
    """A host, a co-host, a listener, someone whose seat is held, a queue and a ban."""
    room = Room("main", resume_grace_ms=GRACE, rng=random.Random(1))
    room.join("h", "Host", T0, token="th")
    room.join("c", "Co", T0, token="tc", role="cohost")
    room.join("l", "Lis", T0, token="tl")
    room.join("gone", "Gone", T0, token="tg")
    room.join("k", "Kicked", T0, token="tk")
    room.handle("h", SetTrack(url="https://example.com/a.mp3", title="A", duration=60.0), T0)
    room.handle("h", QueueAdd(url="https://example.com/b.mp3", title="B", duration=30.0), T0)
    room.handle("h", Volume(volume=0.4), T0)
    room.kick("h", "k", T0 + 1)
    room.leave("gone", T0 + 2)
    room.note_rtt("l", 80.0)
    room.poll(T0 + 100)
    return room


def test_a_replica_is_the_room_another_node_committed() -> None:
    room = busy_room()
    value = json.loads(encode_value(capture(room, "A", None, ["h", "c", "l"])))
    assert value["live"] == {"h": "A", "c": "A", "l": "A"}
    assert value["rtt"] == {"l": 80.0}
    copy = replica("main", value, T0 + 5_000, GRACE, rng=random.Random(2))
    assert copy.state() == room.state()
    assert {pid: p.role for pid, p in copy.participants.items()} == {
        "h": "host",
        "c": "cohost",
        "l": "listener",
    }
    assert copy.host_id == "h"
    assert copy.holds_seat("tg") and not copy.holds_seat("tk")
    assert copy.is_banned("tk", T0 + 5_000)
    # the held seat keeps its deadline (not "grace from now"), and the queue its revision
    assert copy.next_deadline() == room.next_deadline() == T0 + 2 + GRACE
    assert copy.queue_rev == room.queue_rev
    assert copy.lead_ms() == room.lead_ms()
    # a commit from the replica continues the same line of versions
    effects = copy.handle("h", Volume(volume=0.9), T0 + 6_000)
    assert isinstance(effects[0], BroadcastState)
    assert effects[0].state["version"] == room.version + 1
    assert effects[0].queue_rev == room.queue_rev  # the queue did not change


def test_capture_keeps_where_others_are_connected() -> None:
    room = busy_room()
    before = capture(room, "A", None, ["h"])
    before["live"]["c"] = "B"
    before["rtt"]["c"] = 200.0
    after = capture(room, "A", before, ["h"])
    assert after["live"] == {"h": "A", "c": "B", "l": "A"}
    assert after["rtt"]["c"] == 200.0
    assert live_elsewhere(after, "c", "A") and not live_elsewhere(after, "h", "A")
    assert not live_elsewhere(None, "c", "A")
    assert nodes_in(after) == {"A", "B"}
    assert sorted(live_on(after, "A")) == ["h", "l"]


def crowd_room() -> Room:
    """A host and 105 listeners: a crowd (its value names the leads only)."""
    room = Room("main", resume_grace_ms=GRACE)
    room.join("h", "Host", T0, token="th")
    for i in range(PARTICIPANT_LIST_MAX + 5):
        room.join(f"l{i}", f"L{i}", T0, token=f"t{i}")
    return room


def test_a_replica_keeps_this_nodes_crowd_listeners() -> None:
    room = crowd_room()
    value = capture(room, "A", None, room.participants)
    assert set(value["live"]) == {"h"}  # a crowd's value names the leads only
    room.note_rtt("l3", 40.0)
    copy = replica("main", value, T0, GRACE, carry=room, local=["h", "l1", "l3"])
    assert set(copy.participants) == {"h", "l1", "l3"}
    assert copy.participants["l3"].rtt_ms == 40.0
    bare = replica("main", value, T0, GRACE)
    assert set(bare.participants) == {"h"}


def test_a_shared_crowd_is_counted_once_across_nodes() -> None:
    room = crowd_room()  # 105 listeners connected here; the value names the host only
    value = capture(room, "A", None, room.participants)
    assert set(value["live"]) == {"h"}
    # the connected hash: B serves 41 (its 40 listeners and, say, a co-host this
    # copy seats), C is dead (its key expired), D's count cannot be read
    counts = {"A": "106", "B": "41", "C": "7", "D": "junk"}
    there = connected_elsewhere(counts, "A", {"A", "B", "D"})
    assert there == 41
    room.join("co", "Co", T0, token="tco")  # B's co-host: in the value, so seated here
    local = [pid for pid in room.participants if pid != "co"]
    assert unseen_elsewhere(there, room.participants, local) == 40
    # a room that is no crowd anywhere has everyone in its value: nothing unseen
    assert unseen_elsewhere(41, ["h", "x"], ["h"]) == 0
    room.seats.set_elsewhere(40, T0)
    copy = replica("main", value, T0, GRACE, carry=room, local=list(room.participants))
    assert copy.seats.elsewhere == 40  # kept across a rebuild
    assert copy_news(room.seats.presence).recount


def test_a_value_that_cannot_be_read_is_refused() -> None:
    with pytest.raises(BadValue):
        replica("main", {"snap": {"state": {}}}, T0, GRACE)


def test_a_change_not_committed_leaves_no_news_and_no_role_behind() -> None:
    room = crowd_room()
    room.poll(T0 + 10_000)  # the news so far are out
    value = capture(room, "A", None, room.participants)
    local = list(room.participants)
    before = copy_news(room.seats.presence)
    # A change applied to the replica, then refused by Redis: a join and a
    # host transfer to a crowd listener (who is in no value: only here).
    room.join("late", "Late", T0 + 10_001, token="tlate")
    room.handle("h", TransferHost(to="l3"), T0 + 10_001)
    assert room.participants["l3"].role == "host" and "late" in room.seats.presence.joined
    copy = replica("main", value, T0 + 10_002, GRACE, carry=room, local=local, news=before)
    assert copy.participants["l3"].role == "listener"
    assert copy.host_id == "h"
    assert "late" not in copy.participants
    assert copy.poll(T0 + 20_000) == []  # nothing to announce: no join, no role change


def test_carried_news_name_the_role_the_value_gives() -> None:
    room = Room("main", resume_grace_ms=GRACE)
    room.join("h", "Host", T0, token="th")
    room.join("c", "Co", T0, token="tc", role="cohost")  # its news are not out yet
    value = capture(room, "A", None, ["h", "c"])
    value["snap"]["seats"]["seats"][-1]["role"] = "listener"  # another node demoted it since
    copy = replica("main", value, T0 + 1, GRACE, carry=room, local=["h", "c"])
    (delta,) = (e for e in copy.poll(T0 + 10_000) if isinstance(e, BroadcastPresence))
    assert {p["id"]: p["role"] for p in delta.delta["joined"]} == {"h": "host", "c": "listener"}


def test_device_offsets_are_shared_and_every_replica_leads_by_the_largest() -> None:
    room = busy_room()
    room.note_latency_offset("l", 300.0)  # a Bluetooth speaker, connected to node A
    value = capture(room, "A", None, ["h", "c", "l"])
    assert value["offset"] == {"l": 300.0}
    assert shared_offset(value, "l") == 300.0 and shared_offset(value, "h") == 0.0
    on_b = replica("main", json.loads(encode_value(value)), T0 + 5_000, GRACE)
    assert on_b.participants["l"].latency_offset_ms == 300.0
    assert on_b.lead_ms() == room.lead_ms()
    # Node B commits something: it keeps what A (the device's node) said...
    on_b.note_latency_offset("l", 0.0)  # a host's set_latency_offset, not yet reported
    again = capture(on_b, "B", value, [])
    assert again["offset"] == {"l": 300.0}
    # ...and A's replica keeps its own device's newest report over the value.
    room.note_latency_offset("l", 450.0)
    mine = replica("main", again, T0 + 6_000, GRACE, carry=room, local=["h", "c", "l"])
    assert mine.participants["l"].latency_offset_ms == 450.0
    assert capture(mine, "A", again, ["h", "c", "l"])["offset"] == {"l": 450.0}


class Asked:
    """A ``local`` for ``capture`` that records which ids it was asked about."""

    def __init__(self, here: set[str]) -> None:
        self.here = here
        self.asked: list[object] = []

    def __contains__(self, pid: object) -> bool:
        self.asked.append(pid)
        return pid in self.here


def test_capture_asks_about_the_snapshots_seats_only_not_a_crowds_listeners() -> None:
    room = Room("main")
    room.join("h", "host", T0, "th")
    for i in range(PARTICIPANT_LIST_MAX + 50):
        room.join(f"l{i}", f"l{i}", T0, f"t{i}")
    here = set(room.participants)
    local = Asked(here)
    value = capture(room, "A", None, local)
    assert sorted(map(str, local.asked)) == ["h"]  # the one seat a crowd's snapshot keeps
    assert value == capture(room, "A", None, here)
    assert value["live"] == {"h": "A"}


def test_message_head_names_the_room_and_a_commits_revision_unparsed() -> None:
    state = BroadcastState({"version": 8}, 0)
    assert message_head(encode_commit("main", "A", 8, [state], '{"snap":{}}')) == ("main", 8)
    assert message_head(encode_commit("main", "A", 9, [], "{}")) == ("main", 9)
    assert message_head(encode_effects("main", "A", [])) == ("main", None)
    assert message_head(encode_health("main", "A", {"n": 1})) == ("main", None)
    # not in the compact form (or a name that needs escapes): parse the whole message
    assert message_head(encode_closed("main", "A")) is None
    assert message_head(encode_commit('a"b', "A", 3, [], "{}")) is None
    assert message_head("not json") is None
    assert message_head('{"room":"main","node":"A","rev":"7"}') == ("main", None)
