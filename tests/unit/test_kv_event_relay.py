"""The replica's KV-event relay: token ids never leave it, sequence numbers and replay behave as vLLM's do."""

from __future__ import annotations

import asyncio
import os
import stat
import time

import msgspec
import pytest
import zmq

from deployments.kv_event_relay import KVEventRelay, strip_batch
from deployments.kv_events import KVEventSubscriber
from routers.events import AllBlocksCleared, BlockRemoved, BlockStored, decode_batch
from tests.unit.test_routers_events import FakePublisher, _free_port, until

pytestmark = pytest.mark.unit

SALT = ["tenant-a-salt"]


def _stored_array(h: int, tokens=(11, 12, 13)) -> list:
    # vLLM's array form: [tag, block_hashes, parent, token_ids, block_size, lora_id, medium, lora_name, extra_keys]
    return ["BlockStored", [h], None, list(tokens), 16, None, "GPU", None, [SALT]]


def _batch(*events) -> bytes:
    return msgspec.msgpack.encode([time.time(), list(events), 0])


def _raw_events(payload: bytes) -> list:
    return msgspec.msgpack.decode(payload)[1]


def test_strip_batch_empties_token_ids_and_extra_keys_and_keeps_what_routers_read():
    payload = _batch(_stored_array(7), ["BlockRemoved", [7], "GPU"], ["AllBlocksCleared"],
                     {"type": "BlockStored", "block_hashes": [8], "parent_block_hash": 7, "token_ids": [1, 2],
                      "block_size": 16, "lora_id": None, "medium": "CPU", "lora_name": None, "extra_keys": [SALT]})
    stripped = strip_batch(payload)
    raw = _raw_events(stripped)
    assert raw[0][3] == [] and raw[0][8] is None
    assert raw[3]["token_ids"] == [] and "extra_keys" not in raw[3]
    assert b"tenant-a-salt" not in stripped
    before = decode_batch(msgspec.msgpack.decode(payload))[1]
    assert decode_batch(msgspec.msgpack.decode(stripped))[1] == before == [
        BlockStored((7,), "GPU"), BlockRemoved((7,), "GPU"), AllBlocksCleared(), BlockStored((8,), "CPU", 7)]
    with pytest.raises((msgspec.DecodeError, ValueError)):
        strip_batch(b"\xc1 not msgpack")


def test_engine_sockets_are_private_ipc_files_and_the_public_ones_bind_the_given_host():
    relay = KVEventRelay("127.0.0.1", _free_port(), _free_port())
    try:
        assert relay.engine_endpoint.startswith("ipc://") and relay.engine_replay_endpoint.startswith("ipc://")
        directory = os.path.dirname(relay.engine_endpoint.removeprefix("ipc://"))
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        assert relay.endpoint.startswith("tcp://127.0.0.1:") and ";replay=tcp://127.0.0.1:" in relay.endpoint
    finally:
        relay.close()
    assert not os.path.exists(directory)


def test_a_taken_port_fails_the_relay_at_once():
    port = _free_port()
    ctx = zmq.Context.instance()
    holder = ctx.socket(zmq.PUB)
    holder.bind(f"tcp://127.0.0.1:{port}")
    try:
        with pytest.raises(zmq.ZMQError):
            KVEventRelay("127.0.0.1", port, _free_port())
    finally:
        holder.close(0)


def test_relay_forwards_in_order_without_token_ids_fills_gaps_and_serves_replay():
    relay = KVEventRelay("127.0.0.1", _free_port(), _free_port())
    engine = FakePublisher(endpoint=relay.engine_endpoint, replay_endpoint=relay.engine_replay_endpoint)
    ctx = zmq.Context.instance()
    wire = ctx.socket(zmq.SUB)  # what any pod reaching the public port would read
    wire.setsockopt(zmq.SUBSCRIBE, b"")
    wire.connect(relay.endpoint.partition(";")[0])
    seen: list = []
    resets: list = []

    async def scenario():
        await asyncio.sleep(0.3)  # slow joiners: the relay to the engine, the wire to the relay
        engine.publish(_batch(_stored_array(1)), send=False)  # before the relay's first batch: replayed
        engine.publish(_batch(_stored_array(2)))
        await asyncio.sleep(0.2)
        engine.publish(_batch(_stored_array(3)), send=False)  # lost between engine and relay: replayed
        engine.publish(_batch(_stored_array(4)))
        engine.publish(b"\xc1 garbage")  # undecodable: dropped, never forwarded
        await asyncio.sleep(0.3)
        # A router that subscribes now learns the history from the relay's replay buffer.
        sub = KVEventSubscriber(lambda r, e: seen.append(e), resets.append)
        sub.set_endpoints({"r0": relay.endpoint})
        await asyncio.sleep(0.3)
        engine.publish(_batch(_stored_array(5)))
        await until(lambda: len(seen) >= 5)
        await sub.close()

    try:
        asyncio.run(scenario())
        frames = []
        while wire.poll(100):
            frames.append(wire.recv_multipart())
    finally:
        wire.close(0)
        engine.close()
        relay.close()
    assert [int.from_bytes(f[1], "big") for f in frames] == [0, 1, 2, 3, 5]
    for _topic, _seq, payload in frames:
        assert all(ev[3] == [] and ev[8] is None for ev in _raw_events(payload))
        assert b"tenant-a-salt" not in payload
    assert [e.block_hashes for e in seen] == [(1,), (2,), (3,), (4,), (5,)]
    assert resets == [] and relay.dropped == 1
