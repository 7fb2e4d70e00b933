"""The request -> engine-input path and the response building of the OpenAI surface, over a stub replica.

What the replica receives (prompt token ids rendered by vLLM's chat rendering, vLLM's SamplingParams with
structured outputs, logprobs, sampling extras) and what the client gets back (tool calls, logprobs, echo),
with no engine: ``tests.unit.ingress_stub`` answers with chosen text pieces.
"""

from __future__ import annotations

import json

import pytest
from starlette.testclient import TestClient

from tests.unit.ingress_stub import StubHandle, stub_ingress

pytestmark = pytest.mark.unit

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def stub():
    mp = pytest.MonkeyPatch()
    app, ingress, handle = stub_ingress(mp, handle=StubHandle(validate_sampling=True))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, ingress, handle
    mp.undo()


@pytest.fixture
def client(stub):
    client, _, handle = stub
    handle.pieces, handle.finish_reason = None, "length"
    return client


def _events(r) -> list[dict]:
    return [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]


def _sent(stub):
    return stub[2].requests[-1]


def test_chat_rendering_is_vllms(stub, client) -> None:
    """developer role, multi-part text, continue_final_message: the prompt vLLM's renderer makes."""
    from vllm.entrypoints.chat_utils import parse_chat_messages
    from vllm.renderers.hf import safe_apply_chat_template

    msgs = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Count"}, {"type": "text", "text": "to three"}]},
            {"role": "assistant", "content": "One,"}]
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": msgs, "max_tokens": 2,
                                                  "continue_final_message": True, "add_generation_prompt": False})
    assert r.status_code == 200, r.text
    fe = stub[1]._models["smollm2"].frontend
    conv, _, _ = parse_chat_messages(msgs, fe.model_config, content_format="string")
    text = safe_apply_chat_template(fe.model_config, fe.tokenizer, conv, tokenize=False,
                                    add_generation_prompt=False, continue_final_message=True)
    assert _sent(stub).prompt_token_ids == fe.tokenizer.encode(text, add_special_tokens=False)
    assert text.endswith("One,") and "Be brief." in text and "Count\nto three" in text


def test_sampling_params_are_vllms(stub, client) -> None:
    body = {"model": "smollm2", "messages": ASK, "max_completion_tokens": 5, "temperature": 0.5, "top_k": 7,
            "min_p": 0.1, "min_tokens": 2, "repetition_penalty": 1.2, "logit_bias": {"42": -100}, "seed": 9,
            "stop": ["x"], "n": 2, "logprobs": True, "top_logprobs": 2}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    p = _sent(stub).sampling
    assert isinstance(p, SamplingParams) and p.output_kind == RequestOutputKind.DELTA
    assert (p.max_tokens, p.temperature, p.top_k, p.min_p, p.min_tokens, p.repetition_penalty, p.seed, p.n,
            p.logprobs) == (5, 0.5, 7, 0.1, 2, 1.2, 9, 2, 2)
    assert p.stop == ["x"] and p.logit_bias == {42: -100}


@pytest.mark.parametrize("extra", [{"top_k": -5}, {"min_tokens": 9, "max_tokens": 2}, {"stop": [""]},
                                   {"seed": "x"}, {"stream_options": {"include_usage": True}},
                                   {"top_logprobs": 2}, {"use_beam_search": True},
                                   {"messages": [{"role": "user", "content": [
                                       {"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}]}]},
                                   {"chat_template": "{{ messages }}"}])
def test_inputs_vllm_refuses_are_400(client, extra) -> None:
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("prompt", [[1, 2, 10**6], [5, -1], [[1, 2], [3, 10**6]]])
def test_prompt_token_ids_outside_the_vocabulary_are_400(client, prompt) -> None:
    r = client.post("/v1/completions", json={"model": "smollm2", "prompt": prompt, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("prompt"), r.text
    assert "must be in [0, " in r.json()["error"]["message"] or "greater than or equal to 0" in r.text


def test_required_tools_constrain_and_parse(stub, client) -> None:
    stub[2].pieces, stub[2].finish_reason = ['[{"name": "get_time",', ' "parameters": {"city": "Oslo"}}]'], "stop"
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": "required"}
    r = client.post("/v1/chat/completions", json=body).json()
    schema = _sent(stub).sampling.structured_outputs.json
    assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == ""
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": '{"city": "Oslo"}'} and call["id"]
    events = _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    deltas = [e["choices"][0] for e in events]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    calls = [tc for d in deltas for tc in d["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_time"
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in calls)) == {"city": "Oslo"}
    assert deltas[-1]["finish_reason"] == "tool_calls"


def test_named_tool_is_the_output(stub, client) -> None:
    stub[2].pieces, stub[2].finish_reason = ['{"city"', ': "Rome"}'], "stop"
    named = {"type": "function", "function": {"name": "get_weather"}}
    body = {"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": named}
    r = client.post("/v1/chat/completions", json=body).json()
    assert _sent(stub).sampling.structured_outputs.json == WEATHER["function"]["parameters"]
    (call,) = r["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert r["choices"][0]["finish_reason"] == "stop"  # OpenAI: a named tool choice finishes with stop
    calls = [tc for e in _events(client.post("/v1/chat/completions", json={**body, "stream": True}))
             for tc in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"]
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Rome"}'


def test_auto_tools_without_a_parser_is_400_and_none_is_text(client) -> None:
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "tools": [WEATHER],
                                                  "tool_choice": "none", "max_tokens": 2})
    assert r.json()["choices"][0]["message"]["content"] == " w0 w1"


def test_json_schema_reaches_the_engine(stub, client) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "max_tokens": 2,
                                                     "response_format": fmt}).status_code == 200
    assert _sent(stub).sampling.structured_outputs.json == schema
    assert client.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": 2,
                                                "response_format": {"type": "json_object"}}).status_code == 200
    assert _sent(stub).sampling.structured_outputs.json_object is True


def test_chat_logprobs_format(client) -> None:
    r = client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "max_tokens": 2,
                                                  "logprobs": True, "top_logprobs": 2}).json()
    content = r["choices"][0]["logprobs"]["content"]
    assert [t["token"] for t in content] == [" w0", " w1"]
    assert content[0]["logprob"] == -0.5 and [a["token"] for a in content[0]["top_logprobs"]] == [" w0", "alt0"]
    assert content[0]["bytes"] == list(b" w0")
    streamed = [t for e in _events(client.post("/v1/chat/completions", json={
        "model": "smollm2", "messages": ASK, "max_tokens": 2, "logprobs": True, "top_logprobs": 2, "stream": True}))
        if e["choices"][0]["logprobs"] for t in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content


def test_completion_logprobs_and_echo(client) -> None:
    r = client.post("/v1/completions", json={"model": "smollm2", "prompt": "Hello", "max_tokens": 2,
                                             "logprobs": 1}).json()
    lp = r["choices"][0]["logprobs"]
    assert lp["tokens"] == [" w0", " w1"] and lp["text_offset"] == [0, 3] and lp["token_logprobs"] == [-0.5, -0.5]
    assert lp["top_logprobs"][0] == {" w0": -0.5, "alt0": -1.0}
    echoed = client.post("/v1/completions", json={"model": "smollm2", "prompt": ["Hello", "Bye"], "max_tokens": 2,
                                                  "echo": True}).json()
    assert sorted(c["text"] for c in echoed["choices"]) == ["Bye w0 w1", "Hello w0 w1"]
    streamed = "".join(e["choices"][0]["text"] for e in _events(client.post("/v1/completions", json={
        "model": "smollm2", "prompt": "Hello", "max_tokens": 2, "echo": True, "stream": True})))
    assert streamed == "Hello w0 w1"


def test_replicas_are_asked_to_merge_chunks_when_nobody_streams_or_the_ingress_lags(stub, client) -> None:
    _, ingress, handle = stub
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 3}
    asked = []
    for stream, behind in ((True, False), (False, False), (True, True)):
        ingress._lag.behind = behind
        try:
            r = client.post("/v1/chat/completions", json={**body, "stream": stream})
        finally:
            ingress._lag.behind = False
        assert r.status_code == 200
        asked.append(handle.requests[-1].merge_chunks)
    assert asked == [False, True, True]
    assert ingress._lag.threshold_s == 0.005  # configs/cpu.yaml keeps the default stream_merge_lag_ms


def test_tokenize_and_detokenize(stub, client) -> None:
    tok = stub[1]._models["smollm2"].frontend.tokenizer
    r = client.post("/tokenize", json={"model": "smollm2", "prompt": "hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["token_strs"])
    chat = client.post("/tokenize", json={"model": "smollm2", "messages": ASK}).json()
    client.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "max_tokens": 1})
    assert chat["tokens"] == _sent(stub).prompt_token_ids  # the same rendering as generation
    detok = client.post("/detokenize", json={"model": "smollm2", "tokens": r["tokens"]}).json()
    assert detok == {"prompt": "hello world"}
    assert client.post("/tokenize", json=[1, 2]).status_code == 400


def test_auto_tools_with_a_configured_parser(monkeypatch) -> None:
    """A model configured with vLLM's pythonic parser: auto tool calls are parsed, whole and streamed."""
    import yaml

    from tests.unit.ingress_stub import ROOT

    model = yaml.safe_load((ROOT / "configs/cpu.yaml").read_text())["applications"][0]["args"]["models"][0]
    model = {**model, "tool_call_parser": "pythonic", "enable_auto_tool_choice": True}
    handle = StubHandle()
    handle.pieces, handle.finish_reason = ['[get_weather(city=', '"Paris"), get_time(city="Paris")]'], "stop"
    app, _, _ = stub_ingress(monkeypatch, {"models": [model]}, handle=handle)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME]}).json()
        calls = r["choices"][0]["message"]["tool_calls"]
        assert [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]
        assert r["choices"][0]["finish_reason"] == "tool_calls"
        one = c.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK, "tools": [WEATHER, TIME],
                                                   "parallel_tool_calls": False}).json()
        assert len(one["choices"][0]["message"]["tool_calls"]) == 1
        events = _events(c.post("/v1/chat/completions", json={"model": "smollm2", "messages": ASK,
                                                             "tools": [WEATHER, TIME], "stream": True}))
        names = [tc["function"]["name"] for e in events for tc in e["choices"][0]["delta"].get("tool_calls", [])
                 if tc.get("function", {}).get("name")]
        assert names == ["get_weather", "get_time"] and events[-1]["choices"][0]["finish_reason"] == "tool_calls"
