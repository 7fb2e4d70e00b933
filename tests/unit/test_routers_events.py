"""KV events: decoding vLLM's wire format, sequence gaps, and the ZMQ subscriber with replay."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq

from deployments.kv_events import KVEventSubscriber, advertised_endpoint, kv_events_engine_kwargs, parse_endpoint
from routers.events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    SeqTracker,
    coalesce,
    decode_batch,
    obj_medium,
    split_medium,
)

pytestmark = pytest.mark.unit


def _stored(hashes, medium="GPU"):
    return {"type": "BlockStored", "block_hashes": list(hashes), "parent_block_hash": None,
            "token_ids": [], "block_size": 16, "lora_id": None, "medium": medium, "lora_name": None}


def _batch(*events) -> bytes:
    return msgspec.msgpack.encode([time.time(), list(events), 0])


def test_decode_batch_map_and_array_forms_and_bytes_hashes():
    raw = msgspec.msgpack.decode(_batch(
        _stored([1, 2]), {"type": "BlockRemoved", "block_hashes": [2], "medium": "CPU"},
        {"type": "AllBlocksCleared"}, {"type": "SomethingNew"},
    ))
    _ts, events, rank = decode_batch(raw)
    assert events == [BlockStored((1, 2), "GPU"), BlockRemoved((2,), "CPU"), AllBlocksCleared()]
    assert rank == 0
    _, events, _ = decode_batch([0.0, [["BlockStored", [b"\x01" * 9], None, [], 16, None, "OBJ", None]]])
    assert events == [BlockStored((int.from_bytes(b"\x01" * 8, "big"),), "OBJ")]


def test_the_object_store_tier_names_its_directory_epoch_in_the_medium():
    assert obj_medium(1733200000123) == "OBJ@1733200000123" and obj_medium(None) == "OBJ"
    assert split_medium("OBJ@42") == ("OBJ", 42) and split_medium("OBJ@bad") == ("OBJ", None)
    assert split_medium("CPU") == ("CPU", None) and split_medium(None) == ("GPU", None)
    raw = msgspec.msgpack.decode(_batch(_stored([1], obj_medium(7)),
                                        {"type": "BlockRemoved", "block_hashes": [1], "medium": "OBJ@7"}))
    assert decode_batch(raw)[1] == [BlockStored((1,), "OBJ", None, 7), BlockRemoved((1,), "OBJ", 7)]


def test_coalesce_merges_runs_and_keeps_order():
    from routers.precise_index import PreciseIndex

    events = [
        BlockStored((1, 2), "GPU", None), BlockStored((3,), "GPU", 2), BlockStored((9,), "GPU", 7),  # chain breaks at 9
        BlockRemoved((1,)), BlockRemoved((2,)), BlockRemoved((5,), "CPU"), BlockRemoved((6,), "CPU"),
        AllBlocksCleared(), BlockRemoved((7,)), BlockStored((4,), "OBJ", None, 1), BlockStored((8,), "OBJ", 4, 2),
    ]
    out = coalesce(events)
    assert out == [
        BlockStored((1, 2, 3), "GPU", None), BlockStored((9,), "GPU", 7),
        BlockRemoved((1, 2)), BlockRemoved((5, 6), "CPU"),
        AllBlocksCleared(), BlockRemoved((7,)), BlockStored((4,), "OBJ", None, 1), BlockStored((8,), "OBJ", 4, 2),
    ]
    assert coalesce([]) == [] and coalesce(events[:1]) == events[:1]
    one_by_one, merged = PreciseIndex(), PreciseIndex()  # same index either way
    for ev in events:
        one_by_one.on_event("r", ev)
    for ev in out:
        merged.on_event("r", ev)
    assert all(one_by_one.holds("r", h, bit) == merged.holds("r", h, bit) for h in range(10) for bit in (1, 2, 4))
    assert one_by_one.size("r") == merged.size("r")


def test_seq_tracker():
    t = SeqTracker()
    assert [t.observe(s) for s in (5, 6, 6, 9)] == ["ok", "ok", "dup", "gap"]
    t.reset(9)
    assert t.observe(10) == "ok"


def test_engine_kwargs_and_endpoint_format():
    cfg = kv_events_engine_kwargs("ipc:///tmp/x/pub", "ipc:///tmp/x/replay")["kv_events_config"]
    assert cfg["endpoint"] == "ipc:///tmp/x/pub" and cfg["replay_endpoint"] == "ipc:///tmp/x/replay"
    assert cfg["enable_kv_cache_events"] and cfg["publisher"] == "zmq"
    ep = advertised_endpoint("10.0.0.1", 5557, 5558)
    assert parse_endpoint(ep) == ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558")
    assert parse_endpoint(advertised_endpoint("h", 1)) == ("tcp://h:1", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakePublisher:
    """vLLM's ZmqEventPublisher wire behaviour: PUB (topic, seq, payload) + ROUTER replay buffer."""

    def __init__(self, buffer_steps: int = 100, endpoint: str | None = None,
                 replay_endpoint: str | None = None) -> None:
        self.ctx = zmq.Context()
        self.port, self.replay_port = _free_port(), _free_port()
        self.endpoint = endpoint or f"tcp://127.0.0.1:{self.port}"
        self.replay_endpoint = replay_endpoint or f"tcp://127.0.0.1:{self.replay_port}"
        self.pub = self.ctx.socket(zmq.PUB)
        self.pub.bind(self.endpoint)
        self.buffer: list[tuple[int, bytes]] = []
        self.buffer_steps = buffer_steps
        self.seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_replay, daemon=True)
        self._thread.start()

    def publish(self, payload: bytes, *, send: bool = True) -> None:
        if send:
            self.pub.send_multipart((b"", self.seq.to_bytes(8, "big"), payload))
        self.buffer = (self.buffer + [(self.seq, payload)])[-self.buffer_steps:]
        self.seq += 1

    def _serve_replay(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.bind(self.replay_endpoint)
        while not self._stop.is_set():
            if router.poll(20):
                client, _, start = router.recv_multipart()
                for seq, buf in list(self.buffer):
                    if seq >= int.from_bytes(start, "big"):
                        router.send_multipart((client, b"", b"", seq.to_bytes(8, "big"), buf))
                router.send_multipart((client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""))
        router.close(0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.pub.close(0)
        self.ctx.term()


async def until(done: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Return once ``done()`` holds (what crosses a real socket arrives when it arrives); fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"not done after {timeout_s} s"
        await asyncio.sleep(0.01)


async def _run_stream(pub: FakePublisher, script, done: Callable[[list, list], bool], *, replay: bool = True):
    """Subscribe, run ``script``, and wait until ``done(events, resets)``."""
    seen: list[tuple[str, object]] = []
    resets: list[str] = []
    sub = KVEventSubscriber(lambda r, e: seen.append((r, e)), resets.append, replay=replay)
    sub.set_endpoints({"r0": advertised_endpoint("127.0.0.1", pub.port, pub.replay_port)})
    await asyncio.sleep(0.3)  # slow joiner
    await script(pub)
    await until(lambda: done(seen, resets))
    await sub.close()
    return [e for _, e in seen], resets


def test_subscriber_learns_history_and_fills_a_gap_by_replay():
    pub = FakePublisher()

    async def script(p):
        p.publish(_batch(_stored([1])), send=False)  # before the subscriber joined
        p.publish(_batch(_stored([2])))
        await asyncio.sleep(0.2)
        p.publish(_batch(_stored([3])), send=False)  # dropped on the wire
        p.publish(_batch(_stored([4])))

    try:
        events, resets = asyncio.run(_run_stream(pub, script, lambda seen, _: len(seen) >= 4))
    finally:
        pub.close()
    assert [e.block_hashes for e in events] == [(1,), (2,), (3,), (4,)]
    assert resets == []


def test_subscriber_resets_a_replica_when_the_gap_cannot_be_replayed():
    pub = FakePublisher(buffer_steps=2)

    async def script(p):
        p.publish(_batch(_stored([1])))
        await asyncio.sleep(0.2)
        p.publish(_batch(_stored([2])), send=False)
        p.publish(_batch(_stored([3])), send=False)  # the buffer keeps seqs 2..3 only: seq 1 is lost
        p.publish(_batch(_stored([4])))

    try:
        events, resets = asyncio.run(_run_stream(pub, script, lambda seen, resets: len(seen) >= 3 and bool(resets)))
    finally:
        pub.close()
    assert resets == ["r0"]
    assert [e.block_hashes for e in events] == [(1,), (3,), (4,)]
