"""Subscriber of the vLLM replicas' KV events, feeding the precise index in the ingress process.

Owns: ``KVEventSubscriber`` (one asyncio task per replica endpoint, on the router's event loop, so
events are applied between routing decisions without locks), ``kv_events_engine_kwargs`` (what a
replica passes to vLLM to publish) and the advertised-endpoint format. Replicas publish through
``deployments.kv_event_relay`` (token ids stripped).

Wire protocol (vLLM's ``ZmqEventPublisher``): PUB frames ``(topic, seq: 8-byte big-endian, payload)``
with payload = msgpack ``[ts, events, dp_rank]``. Replay: a DEALER sends ``(b"", start_seq)`` to the
publisher's ROUTER socket and receives ``(b"", topic, seq, payload)`` for every buffered batch with
seq >= start_seq, then ``(b"", b"", -1 as 8 signed bytes, b"")``.

Stream handling per replica: the first batch seen triggers a replay from 0 (learn the recent
history an ingress replica missed before subscribing); a gap triggers a replay from the expected
seq; a replay that cannot fill the gap (the publisher's buffer moved on) resets that replica in the
index; a seq going back to 0 means the engine restarted (reset too). Endpoints come from
``ReplicaStats.kv_events_endpoint``: ``tcp://HOST:PORT`` or ``tcp://HOST:PORT;replay=tcp://HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from routers.events import KVEvent, SeqTracker, coalesce, decode_batch

logger = logging.getLogger(__name__)

REPLAY_END = (-1).to_bytes(8, "big", signed=True)  # the seq frame that ends a replay answer
_REPLAY_TIMEOUT_S = 2.0


def kv_events_engine_kwargs(endpoint: str, replay_endpoint: str | None = None, *, topic: str = "") -> dict[str, Any]:
    """vLLM engine kwargs making a replica's engine publish its KV events on ``endpoint`` (+ ``replay_endpoint``).

    A replica passes the private IPC endpoints of its ``deployments.kv_event_relay.KVEventRelay`` (vLLM binds
    IPC endpoints; it would connect to a host:port one), so nothing of vLLM's stream leaves the replica's process;
    the relay publishes the stripped stream on the node IP. Prefix caching must stay on and PYTHONHASHSEED must be
    set to the routing seed in the replica's environment.
    """
    config: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "topic": topic,
    }
    if replay_endpoint is not None:
        config["replay_endpoint"] = replay_endpoint
    return {"kv_events_config": config}


def take_replay_frame(frames: list[bytes], start: int, seen: int, out: list[tuple[int, bytes, bytes]]) -> bool:
    """One frame of a replay answer as a DEALER receives it (``b"", topic, seq, payload``): append
    ``(seq, topic, payload)`` to ``out`` when ``start <= seq < seen`` and it is newer than the last one kept.
    True at the end marker."""
    if len(frames) != 4:
        return False
    if frames[2] == REPLAY_END:
        return True
    seq = int.from_bytes(frames[2], "big")
    if start <= seq < seen and (not out or seq > out[-1][0]):
        out.append((seq, frames[1], frames[3]))
    return False


def advertised_endpoint(host: str, port: int, replay_port: int | None = None) -> str:
    """The string a replica reports in ``ReplicaStats.kv_events_endpoint`` (host reachable by ingress)."""
    base = f"tcp://{host}:{port}"
    return base if replay_port is None else f"{base};replay=tcp://{host}:{replay_port}"


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """``advertised_endpoint`` output -> (pub endpoint, replay endpoint or None)."""
    pub, _, rest = endpoint.partition(";replay=")
    return pub, (rest or None)


class KVEventSubscriber:
    """Keeps one subscription per replica endpoint and hands decoded events to callbacks.

    Args:
        on_event: called as ``on_event(replica_id, event)`` for every event, in stream order.
        on_reset: called as ``on_reset(replica_id)`` when that replica's history is lost.
        replay: use the replica's replay socket (if it advertises one).
        on_batch: optional ``on_batch(replica_id, n_events)`` hook (metrics).
    """

    def __init__(
        self,
        on_event: Callable[[str, KVEvent], None],
        on_reset: Callable[[str], None],
        *,
        replay: bool = True,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self._on_event = on_event
        self._on_reset = on_reset
        self._on_batch = on_batch
        self._replay = replay
        self._ctx = zmq.asyncio.Context.instance()
        self._decoder = msgspec.msgpack.Decoder()
        self._endpoints: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task] = {}

    def set_endpoints(self, endpoints: Mapping[str, str | None]) -> None:
        """Subscribe to exactly these replicas (replica id -> advertised endpoint). Call on the loop."""
        wanted = {rid: ep for rid, ep in endpoints.items() if ep}
        for rid in list(self._tasks):
            if self._endpoints.get(rid) != wanted.get(rid):
                self._stop(rid)
        loop = asyncio.get_running_loop()
        for rid, ep in wanted.items():
            if rid not in self._tasks:
                self._endpoints[rid] = ep
                self._tasks[rid] = loop.create_task(self._stream(rid, ep), name=f"kv-events-{rid}")

    def endpoints(self) -> dict[str, str]:
        return dict(self._endpoints)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for rid in list(self._tasks):
            self._stop(rid)
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def _stop(self, rid: str) -> None:
        task = self._tasks.pop(rid, None)
        self._endpoints.pop(rid, None)
        if task is not None:
            task.cancel()

    async def _stream(self, rid: str, endpoint: str) -> None:
        pub, replay = parse_endpoint(endpoint)
        replay = replay if self._replay else None
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(pub)
        tracker = SeqTracker()
        logger.info("kv events: subscribed to %s at %s", rid, pub)
        try:
            while True:
                _topic, seq_bytes, payload = await sub.recv_multipart()
                seq = int.from_bytes(seq_bytes, "big")
                if tracker.expected is None:  # first batch: fetch the history we missed
                    if seq > 0 and replay:
                        await self._catch_up(rid, replay, 0, seq, reset_if_incomplete=False)
                    tracker.reset(seq)
                    self._apply(rid, payload)
                    continue
                state = tracker.observe(seq)
                if state == "dup":
                    if seq == 0:  # the engine restarted: its old blocks are gone
                        self._on_reset(rid)
                        tracker.reset(0)
                        self._apply(rid, payload)
                    continue
                if state == "gap":
                    await self._catch_up(rid, replay, tracker.expected, seq, reset_if_incomplete=True)
                    tracker.reset(seq)
                self._apply(rid, payload)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("kv events: stream of %s failed; its entries are dropped, resubscribing", rid)
            self._on_reset(rid)
            if self._tasks.get(rid) is asyncio.current_task():  # the next set_endpoints starts it again
                self._tasks.pop(rid, None)
                self._endpoints.pop(rid, None)
        finally:
            sub.close(linger=0)

    async def _catch_up(self, rid: str, replay: str | None, start: int, seen: int, *,
                        reset_if_incomplete: bool) -> bool:
        """Apply batches ``start .. seen-1`` from the replay socket; True if none was missing.

        When some are missing and ``reset_if_incomplete``, the replica's entries are dropped first
        (its state is unknown) and the batches that could be had are applied after.
        """
        batches: list[tuple[int, bytes, bytes]] = []
        if replay:
            try:
                batches = await self._replay_range(replay, start, seen)
            except (TimeoutError, zmq.ZMQError) as err:
                logger.warning("kv events: replay from %s failed: %s", rid, err)
        complete = [b[0] for b in batches] == list(range(start, seen))
        if not complete and reset_if_incomplete:
            logger.warning("kv events: lost batches %d..%d of %s; resetting its entries", start, seen - 1, rid)
            self._on_reset(rid)
        for _, _, payload in batches:
            self._apply(rid, payload)
        return complete

    async def _replay_range(self, endpoint: str, start: int, seen: int) -> list[tuple[int, bytes, bytes]]:
        """Buffered batches ``(seq, topic, payload)`` with ``start <= seq < seen``, in order, without duplicates."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        out: list[tuple[int, bytes, bytes]] = []
        try:
            await sock.send_multipart((b"", start.to_bytes(8, "big")))
            while not take_replay_frame(await asyncio.wait_for(sock.recv_multipart(), _REPLAY_TIMEOUT_S),
                                        start, seen, out):
                pass
            return out
        finally:
            sock.close(linger=0)

    def _apply(self, rid: str, payload: bytes) -> None:
        try:
            _ts, events, _rank = decode_batch(self._decoder.decode(payload))
        except (msgspec.DecodeError, ValueError, TypeError, IndexError) as err:
            logger.warning("kv events: undecodable batch from %s: %s", rid, err)
            return
        for ev in coalesce(events):
            self._on_event(rid, ev)
        if self._on_batch is not None:
            self._on_batch(rid, len(events))
