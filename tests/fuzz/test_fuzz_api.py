"""Fuzzing the ingress app over HTTP (stub replica, no engine): schemathesis from the app's own OpenAPI schema,
and hypothesis-generated JSON bodies near the request models. No response may be a 5xx, and every error must be
in OpenAI's shape.

The stub replica builds vLLM's ``SamplingParams`` from what the ingress sends when vLLM is importable, so
parameters the engine would refuse surface here too. With ``KVSERVE_FUZZ_REPORT`` set, the counts are written
there as JSON (benchmarks/hardening.py reads them).

Its own tier (tests/fuzz): ~40 s of case generation, so ``pytest tests/unit`` stays fast; ``./dev test`` (CI) runs
the whole of ``tests``, this module with its >= 1,000 cases included.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve_app import settings as kv_settings
from tests.unit.ingress_stub import StubHandle, stub_ingress

pytestmark = pytest.mark.fuzz

COUNTS: dict = {"cases": 0, "5xx": 0, "bad_error_shape": 0, "by_status": {}}
FUZZ_SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


def _check(status: int, body: bytes, content_type: str) -> None:
    """No 5xx; a 4xx carries OpenAI's error object (a stream's error event carries it too)."""
    COUNTS["cases"] += 1
    COUNTS["by_status"][str(status)] = COUNTS["by_status"].get(str(status), 0) + 1
    if status >= 500:
        COUNTS["5xx"] += 1
    assert status < 500, body[:500]
    if status >= 400:
        err = json.loads(body).get("error")
        ok = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"} and err["message"]
        COUNTS["bad_error_shape"] += 0 if ok else 1
        assert ok, body[:500]
    elif "text/event-stream" in content_type:
        assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
        for line in body.decode().split("\n\n"):
            if line.startswith("data: {") and '"error"' in line:
                err = json.loads(line[6:])["error"]
                assert set(err) == {"message", "type", "param", "code"}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    path = kv_settings.get("KVSERVE_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(COUNTS, f)


@pytest.fixture(scope="module")
def app():
    mp = pytest.MonkeyPatch()
    app, _, _ = stub_ingress(mp, handle=StubHandle(validate_sampling=True))
    yield app
    mp.undo()


def _operations(app) -> list:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


def test_the_openapi_schema_fuzzed(app):
    """Every operation of the app's OpenAPI schema, with schemathesis' generated cases (valid and invalid)."""
    ops = _operations(app)
    assert {(op.method.upper(), op.path) for op in ops} >= {("POST", "/v1/chat/completions"),
                                                            ("POST", "/v1/completions"), ("GET", "/v1/models")}
    for op in ops:
        @FUZZ_SETTINGS
        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)
               | op.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE))
        def run(case):
            r = case.call()
            _check(r.status_code, r.content, r.headers.get("content-type", [""])[0])

        run()


# --- hypothesis: bodies near the request models ------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=8)
def _maybe(s):
    """Mostly a plausible value (within or just outside the documented range), 1 in 10 anything at all."""
    return st.integers(0, 9).flatmap(lambda k: _json if k == 0 else s)


_sampling = {
    "stream": _maybe(st.booleans()), "n": _maybe(st.integers(0, 3)), "max_tokens": _maybe(st.integers(0, 64)),
    "temperature": _maybe(st.floats(-0.5, 2.5)), "top_p": _maybe(st.floats(-0.1, 1.1)),
    "top_k": _maybe(st.integers(-3, 100)), "seed": _maybe(st.integers(-2**64, 2**64)),
    "stop": _maybe(st.lists(st.text(max_size=5), max_size=5)), "min_tokens": _maybe(st.integers(-1, 8)),
    "presence_penalty": _maybe(st.floats(-2.5, 2.5)), "frequency_penalty": _maybe(st.floats(-2.5, 2.5)),
    "stop_token_ids": _maybe(st.lists(st.integers(-5, 2**40), max_size=3)), "cache_salt": _maybe(st.text(max_size=8)),
    "stream_options": _maybe(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "logprobs": _maybe(st.booleans()), "ignore_eos": _maybe(st.booleans()),
}
_content = st.one_of(st.text(max_size=40), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=2))
_message = st.fixed_dictionaries({"role": _maybe(st.sampled_from(["system", "user", "assistant", "developer", "tool"])),
                                  "content": _maybe(_content)})
_chat = st.fixed_dictionaries({"model": _maybe(st.just("smollm2")),
                               "messages": _maybe(st.lists(_message, min_size=1, max_size=3))},
                              optional={**_sampling, "max_completion_tokens": _maybe(st.integers(0, 64)),
                                        "tools": _json, "response_format": _json})
_prompt = st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 60000), max_size=8),
                    st.lists(st.text(max_size=10), max_size=3), st.lists(st.lists(st.integers(0, 50000), max_size=5),
                                                                         max_size=3), _json)
_completion = st.fixed_dictionaries({"model": _maybe(st.just("smollm2")), "prompt": _prompt},
                                    optional={**_sampling, "echo": _json, "suffix": _json})


@pytest.fixture(scope="module")
def client(app):
    from starlette.testclient import TestClient

    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@FUZZ_SETTINGS
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=st.one_of(_chat, _completion, _json))
def test_request_bodies_fuzzed(client, path, body):
    r = client.post(path, content=json.dumps(body, allow_nan=True), headers={"content-type": "application/json"})
    _check(r.status_code, r.content, r.headers.get("content-type", ""))


_valid = st.fixed_dictionaries(
    {"model": st.just("smollm2"),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": st.text(max_size=60)}), min_size=1, max_size=3)},
    optional={"stream": st.booleans(), "n": st.integers(1, 3), "max_tokens": st.integers(1, 32),
              "temperature": st.floats(0.05, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(1, 50),
              "seed": st.integers(0, 2**31), "stop": st.lists(st.text(min_size=1, max_size=5), max_size=4),
              "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2), "ignore_eos": st.booleans(),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})})


@FUZZ_SETTINGS
@given(body=_valid)
def test_valid_requests_always_succeed(client, body):
    if not body.get("stream"):
        body.pop("stream_options", None)  # vLLM refuses stream_options without stream=True, as `vllm serve` does
    r = client.post("/v1/chat/completions", json=body)
    _check(r.status_code, r.content, r.headers.get("content-type", ""))
    assert r.status_code == 200, r.text[:300]


@FUZZ_SETTINGS
@given(body=st.binary(max_size=64))
def test_raw_bytes_fuzzed(client, body):
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    _check(r.status_code, r.content, r.headers.get("content-type", ""))


def test_enough_cases_ran():
    """The fuzz tests above (run in file order) generated at least 1,000 requests and found no 5xx."""
    if COUNTS["cases"] == 0:
        pytest.skip("run with the fuzz tests of this module")
    assert COUNTS["cases"] >= 1000 and COUNTS["5xx"] == 0 and COUNTS["bad_error_shape"] == 0, COUNTS
    assert COUNTS["by_status"].get("200", 0) >= 100, COUNTS  # the success path was exercised too
