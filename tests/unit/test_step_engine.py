"""benchmarks.step_engine.StepClockEngine: one token per active stream per step, counters for the benchmark."""

from __future__ import annotations

import asyncio
import json

from benchmarks.step_engine import StepClockEngine
from deployments.protocol import GenerateRequest


def test_streams_share_the_step_clock(tmp_path):
    async def run():
        eng = StepClockEngine(step_s=0.005, counters_dir=str(tmp_path))

        async def one(rid: str, n: int):
            req = GenerateRequest(request_id=rid, model_id="m", prompt_token_ids=list(range(40)),
                                  sampling={"max_tokens": n})
            return [out async for out in eng.generate(req)]

        a, b = await asyncio.gather(one("a", 5), one("b", 3))
        running = eng.stats.num_running
        await asyncio.sleep(0.3)  # past COUNTERS_EVERY_S: the clock wrote its counters
        eng.shutdown()
        return eng, a, b, running

    eng, a, b, running = asyncio.run(run())
    assert [o.outputs[0].text for o in a] == [" w0", " w1", " w2", " w3", " w4"]
    assert [o.finished for o in b] == [False, False, True] and b[-1].outputs[0].finish_reason == "length"
    assert running == 0 and eng.stats.kv_usage == 0.0
    counters = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert counters["tokens"] == 8 and counters["steps"] >= 5
