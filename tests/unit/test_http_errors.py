"""Every error of the ingress app in OpenAI's shape, and the request limits (stub replica, no engine):
unknown routes and models, wrong methods, undecodable and oversized bodies, caps on prompts and choices,
a prompt surely too long refused before tokenization, and a bug answered as a shaped 500."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.unit.ingress_stub import stub_ingress

pytestmark = pytest.mark.unit

CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _send(monkeypatch, method: str, path: str, *, body: bytes | None = None, json_body=None,
                headers: dict | None = None, overrides: dict | None = None, patch=None) -> httpx.Response:
    app, obj, _ = stub_ingress(monkeypatch, overrides)
    if patch is not None:
        patch(obj)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://kvserve") as c:
        if json_body is not None:
            return await c.request(method, path, json=json_body, headers=headers)
        return await c.request(method, path, content=body, headers=headers)


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    if code is not None:
        assert err["code"] == code, err
    return err


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize("method, path, status, code", [
    ("POST", "/v1/nope", 404, "unknown_url"),
    ("GET", "/", 404, "unknown_url"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
])
async def test_unknown_routes_and_methods(monkeypatch, method, path, status, code):
    err = _error(await _send(monkeypatch, method, path), status, code)
    assert path in err["message"]


async def test_unknown_model_is_a_404(monkeypatch):
    err = _error(await _send(monkeypatch, "POST", "/v1/chat/completions", json_body={**CHAT, "model": "nope"}),
                 404, "model_not_found")
    assert err["param"] == "model"


@pytest.mark.parametrize("body, code", [
    (b'{"model": "smollm2", "messages": [', "invalid_json"),
    (b"", None),  # no body: the required fields are missing
    (b'{"model": "smollm2", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_body"),  # not UTF-8
    (b"[1, 2, 3]", None),
    (b'"just a string"', None),
    (b"null", None),
    (b'{"model": "smollm2", "messages": 5}', None),  # chat: vLLM's validator raises TypeError on it
    (b'{"model": "smollm2", "prompt": {"a": 1}, "messages": 5}', None),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_undecodable_bodies_are_400(monkeypatch, body, code, path):
    _error(await _send(monkeypatch, "POST", path, body=body, headers=JSON), 400, code)


async def test_a_body_that_is_not_declared_json_is_a_400(monkeypatch):
    _error(await _send(monkeypatch, "POST", "/v1/chat/completions", body=json.dumps(CHAT).encode(),
                       headers={"content-type": "application/x-www-form-urlencoded"}), 400)  # curl -d without -H


async def test_a_validation_error_names_the_field(monkeypatch):
    err = _error(await _send(monkeypatch, "POST", "/v1/chat/completions", json_body={**CHAT, "temperature": "hot"}),
                 400)
    assert err["param"] == "temperature"


async def test_a_bug_is_a_shaped_500(monkeypatch):
    def patch(obj):
        def boom(model_id):
            raise KeyError("secret internals")
        monkeypatch.setattr(obj, "_model", boom)

    err = _error(await _send(monkeypatch, "POST", "/v1/chat/completions", json_body=CHAT, patch=patch),
                 500, "internal_error")
    assert "secret" not in err["message"]


async def test_a_body_over_the_limit_is_a_413_before_it_is_read(monkeypatch):
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    over = {"ingress": {"max_body_bytes": 4096}}
    _error(await _send(monkeypatch, "POST", "/v1/chat/completions", body=big, headers=JSON, overrides=over),
           413, "request_too_large")

    async def chunked():  # no Content-Length: counted while it is read
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    app, _, handle = stub_ingress(monkeypatch, over)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        r = await c.post("/v1/chat/completions", content=chunked(), headers=JSON)
    _error(r, 413, "request_too_large")
    assert handle.requests == []
    small = await _send(monkeypatch, "POST", "/v1/chat/completions", json_body=CHAT, overrides=over)
    assert small.status_code == 200
    unlimited = {"ingress": {"max_body_bytes": None}}
    r = await _send(monkeypatch, "POST", "/v1/chat/completions", body=big, headers=JSON, overrides=unlimited)
    assert r.status_code == 200


async def test_prompt_and_choice_caps(monkeypatch):
    over = {"ingress": {"max_prompts_per_request": 4, "max_choices_per_request": 6}}
    ok = {"model": "smollm2", "prompt": ["a", "b", "c"], "max_tokens": 1, "n": 2}
    r = await _send(monkeypatch, "POST", "/v1/completions", json_body=ok, overrides=over)
    assert r.status_code == 200 and len(r.json()["choices"]) == 6
    _error(await _send(monkeypatch, "POST", "/v1/completions", json_body={**ok, "prompt": ["a"] * 5, "n": 1},
                       overrides=over), 400, "too_many_prompts")
    _error(await _send(monkeypatch, "POST", "/v1/completions", json_body={**ok, "n": 3}, overrides=over),
           400, "too_many_choices")
    _error(await _send(monkeypatch, "POST", "/v1/chat/completions", json_body={**CHAT, "n": 7}, overrides=over),
           400, "too_many_choices")
    # One prompt of token ids is one prompt, however long.
    r = await _send(monkeypatch, "POST", "/v1/completions", json_body={**ok, "prompt": [1] * 10, "n": 1},
                    overrides=over)
    assert r.status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "hello world " * 200_000}]}),
    ("/v1/completions", {"model": "smollm2", "prompt": "hello world " * 200_000, "max_tokens": 2}),
])
async def test_a_prompt_surely_too_long_is_refused_before_it_is_tokenized(monkeypatch, path, body):
    # 2.4 M characters: at most 81 characters per SmolLM2 token, so more than 4096 x 81; tokenizing it takes seconds.
    app, _, _ = stub_ingress(monkeypatch)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve") as c:
        start = time.perf_counter()
        r = await c.post(path, json=body)
        assert time.perf_counter() - start < 1.0
    err = _error(r, 400, "context_length_exceeded")
    assert "4096" in err["message"]


async def test_a_prompt_that_may_fit_is_tokenized_and_checked_exactly(monkeypatch):
    body = {**CHAT, "messages": [{"role": "user", "content": "hello world " * 1000}], "max_tokens": 3000}
    err = _error(await _send(monkeypatch, "POST", "/v1/chat/completions", json_body=body), 400,
                 "context_length_exceeded")
    assert "in the messages" in err["message"]  # the exact check, after tokenization
