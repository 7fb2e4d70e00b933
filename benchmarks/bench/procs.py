"""One bench run across N client processes (``--processes N``): spawn, start together, collect.

Owns ``run_processes`` and the process entry point. Each process runs the ordinary asyncio load
generator (``loadgen.run_warmup`` then ``run_measured``) on its part of the load (``split.split_load``),
with its own connection pool, so one event loop parsing every SSE chunk of the run cannot delay the
others' reads. The parent sends no request; it only starts the parts and merges their records
(``split.merge_parts``).

    parent                                       process k (spawned)
    start N processes                       -->  connection pool, GET /models, its warm-up share
                                            <--  ("ready", k)
    all ready: go_at = now + GO_DELAY_S     -->  sleep until go_at, then the measured phase
                                            <--  ("done", k, PartResult)  or  ("error", k, (error, traceback))
    merge_parts

A process that fails or dies without reporting ends the run with ``ClientProcessError`` (one line;
the traceback is logged); the others are terminated. Answers' text never crosses back (records only).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import queue
import time
import traceback
from datetime import UTC, datetime

import httpx

from benchmarks.bench.client import ClientSettings
from benchmarks.bench.loadgen import LoadSpec, RunOutcome, run_measured, run_warmup
from benchmarks.bench.spec import BenchRequest
from benchmarks.bench.split import PartResult, deal, merge_parts

logger = logging.getLogger(__name__)

#: seconds between the last process being ready and the common start: the go signal reaches all
GO_DELAY_S = 0.2
_POLL_S = 0.5


class ClientProcessError(RuntimeError):
    """A client process failed or died; the message says which and why."""


def run_processes(workload, specs: list[LoadSpec], warmup: list[BenchRequest], settings: ClientSettings, *,
                  keep_text: bool) -> tuple[datetime, RunOutcome]:
    """Run part k of the load (``specs[k]``, sessions of ``specs[k].shard``) in process k; merge the results.

    Returns the common start instant and the merged outcome.
    """
    ctx = mp.get_context("spawn")
    up = ctx.Queue()
    go = ctx.Event()
    go_at = ctx.Value("d", 0.0)
    procs = [ctx.Process(target=_process_main, name=f"bench-client-{k}", daemon=True,
                         args=(k, workload, spec, deal(warmup, spec.shard), settings, keep_text, up, go, go_at))
             for k, spec in enumerate(specs)]
    for proc in procs:
        proc.start()
    parts: dict[int, PartResult] = {}
    ready: set[int] = set()
    started_at = None
    try:
        while len(parts) < len(procs):
            kind, index, payload = _receive(up, procs, set(parts))
            if kind == "error":
                error, trace = payload
                logger.warning("client process %d failed:\n%s", index, trace)
                raise ClientProcessError(f"client process {index} failed: {error}")
            if kind == "done":
                parts[index] = payload
                continue
            ready.add(index)
            if len(ready) == len(procs):
                go_at.value = time.time() + GO_DELAY_S
                started_at = datetime.fromtimestamp(go_at.value, UTC)
                go.set()
                logger.info("bench: %d client processes ready; start at %s", len(procs), started_at)
    finally:
        failed = len(parts) < len(procs)
        for proc in procs:
            if failed and proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(10)
    return started_at, merge_parts(list(parts.values()))


def _receive(up, procs: list, finished: set[int]) -> tuple:
    """The next message; raise when a process that has not reported is gone and nothing is left to read."""
    while True:
        try:
            return up.get(timeout=_POLL_S)
        except queue.Empty:
            gone = [k for k, p in enumerate(procs) if k not in finished and not p.is_alive()]
            if not gone:
                continue
            try:  # it may have reported and exited since the read timed out
                return up.get(timeout=_POLL_S)
            except queue.Empty:
                k = gone[0]
                raise ClientProcessError(f"client process {k} exited with code {procs[k].exitcode} "
                                         "without a result") from None


def _process_main(index: int, workload, spec: LoadSpec, warmup: list[BenchRequest], settings: ClientSettings,
                  keep_text: bool, up, go, go_at) -> None:
    logging.basicConfig(level=logging.WARNING, format=f"%(levelname)s %(name)s[{index}]: %(message)s")
    try:
        part = asyncio.run(_part(index, workload, spec, warmup, settings, keep_text, up, go, go_at))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which ends the run
        up.put(("error", index, (f"{type(exc).__name__}: {exc}", traceback.format_exc(limit=8))))
        return
    up.put(("done", index, part))


async def _part(index: int, workload, spec: LoadSpec, warmup: list[BenchRequest], settings: ClientSettings,
                keep_text: bool, up, go, go_at) -> PartResult:
    async with settings.open(spec.max_connections) as http:
        client = settings.client(http)
        sessions = workload.sessions(spec.shard)
        try:  # as the one-process preflight does: the HTTP stack's first use costs ~0.1 s, not in the measure
            await http.get(f"{settings.base_url}/models", timeout=10.0)
        except httpx.HTTPError as exc:
            logger.warning("client process %d: GET /models failed: %s", index, exc)
        warm = await run_warmup(client, warmup, spec.warmup_width) if warmup else []
        up.put(("ready", index, None))
        while not await asyncio.to_thread(go.wait, _POLL_S):
            parent = mp.parent_process()
            if parent is not None and not parent.is_alive():
                raise ClientProcessError("the parent process is gone")
        await asyncio.sleep(max(0.0, go_at.value - time.time()))
        started = time.time()
        outcome = await run_measured(client, sessions, spec, keep_text=keep_text)
    outcome.warmup_records = warm
    for record in outcome.records:
        record.text = None
    return PartResult(index, outcome, started)
