"""A replica's KV-event relay: vLLM publishes on private IPC sockets, the relay republishes without token ids.

Owns: ``strip_batch`` (an encoded event batch with every ``BlockStored``'s token ids emptied and its extra keys
dropped) and ``KVEventRelay`` (one thread per replica: a SUB socket on vLLM's IPC publisher, a PUB socket and a
replay ROUTER socket on the node IP, and a replay buffer of the stripped batches).

Why: vLLM's publisher binds its PUB socket on every interface (it binds wildcard endpoints only) and its
``BlockStored`` events carry the token ids of every cached block, i.e. the prompts, and extra keys that can hold
a tenant's cache salt. Routers need only block hashes, the parent hash and the medium. With the relay, vLLM's two
sockets are IPC files in a directory only this replica's user can open, and the one stream that leaves the
process is the stripped one, on the node IP the ingress subscribes to.

The wire protocol is vLLM's (``deployments.kv_events`` subscribes to it unchanged): the same topic, the same
sequence numbers (a gap the relay sees, or history before its first batch, is filled from vLLM's replay socket first;
a sequence number back at 0 is an engine restart and empties the buffer), replay requests answered from the
relay's own buffer. A batch the relay cannot decode is dropped (never forwarded with its token ids): its
subscribers see a gap, and their replay, missing it too, resets that replica in their index.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections import deque
from typing import Any

import msgspec
import zmq

from deployments.kv_events import REPLAY_END, advertised_endpoint, take_replay_frame

logger = logging.getLogger(__name__)

_TOKEN_IDS, _EXTRA_KEYS = 3, 8  # positions in an array-encoded BlockStored: [tag, hashes, parent, token_ids, ...]
_REPLAY_TIMEOUT_MS = 2000

_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def _strip_event(raw: Any) -> Any:
    if isinstance(raw, dict):
        if raw.get("type") == "BlockStored":
            raw["token_ids"] = []
            raw.pop("extra_keys", None)
        return raw
    if isinstance(raw, list) and raw and raw[0] == "BlockStored":
        if len(raw) > _TOKEN_IDS:
            raw[_TOKEN_IDS] = []
        if len(raw) > _EXTRA_KEYS:
            raw[_EXTRA_KEYS] = None
    return raw


def strip_batch(payload: bytes) -> bytes:
    """A msgpack ``[ts, events, dp_rank]`` batch with no token ids or extra keys left in it (raises on bad input)."""
    batch = _decoder.decode(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("an event batch is [ts, events, dp_rank]")
    batch[1] = [_strip_event(e) for e in batch[1]]
    return _encoder.encode(batch)


class KVEventRelay:
    """Relays one engine's KV events from private IPC sockets to ``tcp://host:port`` (+ replay), stripped.

    Give vLLM ``engine_endpoint`` and ``engine_replay_endpoint``; advertise ``endpoint`` to the routers.
    The public sockets are bound here, so a taken port fails the replica's start, not a later request.
    """

    def __init__(self, host: str, port: int, replay_port: int, *, buffer_steps: int = 10_000) -> None:
        self._dir = tempfile.mkdtemp(prefix="kvserve-kv-events-")  # mode 0700
        self.engine_endpoint = f"ipc://{os.path.join(self._dir, 'pub')}"
        self.engine_replay_endpoint = f"ipc://{os.path.join(self._dir, 'replay')}"
        self.endpoint = advertised_endpoint(host, port, replay_port)
        self._ctx = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(self.engine_endpoint)  # vLLM binds it when the engine starts
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            self._pub.bind(f"tcp://{host}:{port}")
            self._router.bind(f"tcp://{host}:{replay_port}")
        except zmq.ZMQError:
            self._close_sockets()
            raise
        self._buffer: deque[tuple[int, bytes, bytes]] = deque(maxlen=buffer_steps)  # (seq, topic, payload)
        self._expected: int | None = None
        self.relayed = 0
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-relay", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, close the sockets and remove the IPC directory."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._close_sockets()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _close_sockets(self) -> None:
        for s in (self._sub, self._pub, self._router):
            s.close(linger=0)

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                ready = dict(poller.poll(100))
                if self._sub in ready:
                    self._on_batch(*self._sub.recv_multipart())
                if self._router in ready:
                    self._serve_replay(self._router.recv_multipart())
            except zmq.ZMQError as err:
                if self._stop.is_set():
                    return
                logger.warning("kv event relay: %s", err)
            except Exception:  # the relay outlives one bad batch
                logger.exception("kv event relay: batch failed")

    def _on_batch(self, topic: bytes, seq_bytes: bytes, payload: bytes, *_: bytes) -> None:
        seq = int.from_bytes(seq_bytes, "big")
        if seq == 0 and self._expected not in (None, 0):  # the engine restarted: its old history is gone
            self._buffer.clear()
            self._expected = None
        if self._expected is not None and seq < self._expected:
            return  # already relayed
        start = 0 if self._expected is None else self._expected  # the first batch seen: fetch what came before
        if seq > start:
            for missed_seq, missed_topic, missed in self._engine_replay(start, seq):
                self._forward(missed_topic, missed_seq, missed)
        self._forward(topic, seq, payload)

    def _forward(self, topic: bytes, seq: int, payload: bytes) -> None:
        self._expected = seq + 1
        try:
            stripped = strip_batch(payload)
        except (msgspec.DecodeError, ValueError, TypeError) as err:
            self.dropped += 1
            logger.warning("kv event relay: undecodable batch %d dropped: %s", seq, err)
            return
        self._pub.send_multipart((topic, seq.to_bytes(8, "big"), stripped))
        self._buffer.append((seq, topic, stripped))
        self.relayed += 1

    def _engine_replay(self, start: int, seen: int) -> list[tuple[int, bytes, bytes]]:
        """Batches ``start .. seen-1`` from vLLM's replay socket (those it still holds)."""
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, _REPLAY_TIMEOUT_MS)
        out: list[tuple[int, bytes, bytes]] = []
        try:
            sock.connect(self.engine_replay_endpoint)
            sock.send_multipart((b"", start.to_bytes(8, "big")))
            while not take_replay_frame(sock.recv_multipart(), start, seen, out):
                pass
        except zmq.ZMQError as err:
            logger.warning("kv event relay: replay of %d..%d from the engine failed: %s", start, seen - 1, err)
        finally:
            sock.close(linger=0)
        return out

    def _serve_replay(self, frames: list[bytes]) -> None:
        """Answer ``(identity, b"", start_seq)`` the way vLLM's replay socket does, from the stripped buffer."""
        if len(frames) != 3:
            return
        identity, _, start_bytes = frames
        start = int.from_bytes(start_bytes, "big")
        for seq, topic, payload in list(self._buffer):
            if seq >= start:
                self._router.send_multipart((identity, b"", topic, seq.to_bytes(8, "big"), payload))
        self._router.send_multipart((identity, b"", b"", REPLAY_END, b""))
