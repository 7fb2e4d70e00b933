"""The ingress -> replica path over the fake engine (real Ray Serve, no vLLM): fast tests of what it must do.

The engine is ``tests.fakes.engine:FakeEngine`` (configs/cpu.yaml with ``models[].engine_class``): answers
are deterministic (" w0 w1 ..."), repeated prefixes are cached per 16-token block, so these tests check the
serving path itself: streaming and not, batched prompts, the per-stage histograms in Prometheus text,
long prompts prepared off the event loop, and block hashes computed by the ingress once it knows the
engine's block size.
"""

from __future__ import annotations

import asyncio
import re
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from deployments.stages import STAGES
from tests.integration.conftest import fake_cpu_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_url(start_app) -> str:
    return start_app(overrides={"models": [fake_cpu_model()]})


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _counts(text: str, stage: str) -> dict[str, float]:
    """replica label -> sample count of one stage histogram of this module's model."""
    out = {}
    for m in re.finditer(rf'^ray_kvserve_stage_{stage}_milliseconds_count\{{([^}}]*)\}} (\S+)$',
                         text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("model") != "smollm2":
            continue  # another module's app on the same Ray (its series stay in the node's metrics agent)
        out[labels.get("replica", "")] = out.get(labels.get("replica", ""), 0) + float(m.group(2))
    return out


def test_answers_stream_and_batch(base_url):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    r = client.completions.create(model="smollm2", prompt="hello there", max_tokens=4)
    assert r.choices[0].text == " w0 w1 w2 w3" and r.usage.completion_tokens == 4
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="hello again", max_tokens=3, stream=True))
    assert text == " w0 w1 w2"
    batch = client.completions.create(model="smollm2", prompt=["a", "b", "c"], max_tokens=2, n=2)
    assert len(batch.choices) == 6 and {c.text for c in batch.choices} == {" w0 w1"}
    chat = client.chat.completions.create(model="smollm2", max_tokens=2,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content == " w0 w1"


def test_stage_histograms_cover_every_stage(base_url, ray_cluster):
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    doc = "the same long document " * 200  # > 16-token blocks, so the ingress hashes it
    for i in range(6):
        client.chat.completions.create(model="smollm2", max_tokens=2, stream=i % 2 == 0,
                                       messages=[{"role": "user", "content": doc + str(i)}])
    deadline, missing = time.time() + 60, list(STAGES)
    while missing and time.time() < deadline:
        text = _scrape(ray_cluster.metrics_port)
        missing = [s for s in STAGES if sum(_counts(text, s).values()) < 6]
        for gauge in ("ray_kvserve_ingress_loop_lag_milliseconds{", "ray_kvserve_ingress_loop_busy_ratio{"):
            if gauge not in text:
                missing.append(gauge)
        if missing:
            client.completions.create(model="smollm2", prompt="keep the exporter busy", max_tokens=1)
            time.sleep(1)
    assert not missing, f"stages without samples: {missing}"
    replicas = {r for s in STAGES for r in _counts(text, s)}
    assert replicas and "" not in replicas, f"every stage is labelled with the replica that served: {replicas}"
    assert "ray_kvserve_stage_route_milliseconds_count" in text


async def test_long_prompt_does_not_stall_short_ones(base_url):
    """A chat of 30,000 messages is rendered and tokenized on the model's prep thread: short requests sent after it
    finish before it. (A long completion prompt no longer serves: one that cannot fit the context is refused
    before tokenizing, deployments.limits.)"""
    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    huge = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"word {i}"} for i in range(30_000)]
    finished: list[str] = []

    async def big() -> None:
        try:
            await client.chat.completions.create(model="smollm2", messages=huge, max_tokens=1)
        except Exception as err:  # noqa: BLE001 - longer than the model: a 400 once tokenized
            assert "maximum context length" in str(err)
        finished.append("big")

    async def short(i: int) -> None:
        await client.completions.create(model="smollm2", prompt="short", max_tokens=1)
        finished.append(f"short{i}")

    task = asyncio.create_task(big())
    await asyncio.sleep(0.3)  # the big body is in and being rendered
    await asyncio.gather(*(short(i) for i in range(3)))
    await task
    assert finished.index("big") >= 1, f"short requests waited for the long prompt's tokenization: {finished}"
