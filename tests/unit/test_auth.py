"""API keys, tenants, per-tenant limits and cache isolation (deployments.auth), alone and in the ingress app."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest

from deployments import rejections
from deployments.auth import Gate, Tenant, load_keys, parse_keys
from deployments.metrics import metrics
from deployments.rejections import record_auth_rejection
from serve_app.config import AppConfig, AuthConfig, ConfigError, load_app_config
from tests.unit.ingress_stub import INGRESS_DEPLOYMENT, StubHandle, stub_ingress

pytestmark = pytest.mark.unit

KEYS = {"KVSERVE_API_KEYS": "acme:sk-acme-1, beta:sk-beta-1\n# comment\nacme:sk-acme-2"}


def _gate(on_reject=None, **auth) -> Gate:
    cfg = AuthConfig.model_validate({"enabled": True, **auth})
    return Gate(cfg, load_keys(cfg, KEYS), on_reject=on_reject or (lambda *_: None))


def test_keys_come_from_the_environment_a_file_or_a_mounted_secret_directory(tmp_path):
    assert sorted(load_keys(AuthConfig(enabled=True), KEYS).values()) == ["acme", "acme", "beta"]
    f = tmp_path / "keys"
    f.write_text("gamma:sk-g\n")
    assert list(load_keys(AuthConfig(api_keys_env=None, api_keys_path=str(f)), {}).values()) == ["gamma"]
    d = tmp_path / "secret"
    (d / "..2026_12_02").mkdir(parents=True)  # the kubelet's own entries are skipped
    (d / "..data").symlink_to(d / "..2026_12_02")
    (d / "acme").write_text("sk-a1\nsk-a2\n")
    (d / "beta").write_text("sk-b\n")
    keys = load_keys(AuthConfig(api_keys_env=None, api_keys_path=str(d)), {})
    assert sorted(keys.values()) == ["acme", "acme", "beta"]
    assert "sk-a1" not in str(keys)  # only digests are kept


def test_malformed_or_missing_key_sources_are_precise_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\$KVSERVE_API_KEYS, line 1: expected `tenant:key`"):
        parse_keys("just-a-key", "$KVSERVE_API_KEYS")
    with pytest.raises(ConfigError, match="auth.api_keys_path: cannot read"):
        load_keys(AuthConfig(api_keys_path=str(tmp_path / "absent")), {})
    app = AppConfig.model_validate({"models": [{"id": "m", "path": "p", "deployment": {"max_ongoing_requests": 1}}],
                                    "auth": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"auth.enabled but no API key was found in \$KVSERVE_API_KEYS"):
        Gate.from_app(app, environ={})


def test_the_auth_config_rejects_unknown_keys_and_keys_in_the_yaml():
    base = {"models": [{"id": "m", "path": "p", "deployment": {"max_ongoing_requests": 1}}]}
    with pytest.raises(ConfigError, match="auth.keys: Extra inputs are not permitted"):
        load_app_config({**base, "auth": {"keys": {"acme": "sk-1"}}})
    with pytest.raises(ConfigError, match="needs api_keys_env or api_keys_path"):
        load_app_config({**base, "auth": {"enabled": True, "api_keys_env": None}})


def test_a_missing_or_wrong_key_is_a_401_and_a_right_one_names_its_tenant():
    gate = _gate(tenants={"beta": {"cache_group": "shared"}})
    for header in (None, "", "Basic abc", "Bearer ", "Bearer sk-nope"):
        with pytest.raises(Exception) as err:
            gate.authenticate(header, now=0)
        assert err.value.status == 401 and err.value.body()["error"]["code"] == "invalid_api_key"
        assert err.value.headers == {"WWW-Authenticate": "Bearer"}
    assert gate.authenticate("Bearer sk-acme-2", now=0) == Tenant("acme", "acme")
    assert gate.authenticate("bearer sk-beta-1", now=0) == Tenant("beta", "shared")


def test_requests_per_min_refuses_with_retry_after_and_refills():
    gate = _gate(tenants={"acme": {"requests_per_min": 2}})
    gate.authenticate("Bearer sk-acme-1", now=0)
    gate.authenticate("Bearer sk-acme-2", now=0)  # both keys draw on the tenant's bucket
    with pytest.raises(Exception) as err:
        gate.authenticate("Bearer sk-acme-1", now=1)
    e = err.value
    assert e.status == 429 and e.body()["error"]["code"] == "rate_limit_exceeded" and e.type == "requests"
    assert e.headers == {"Retry-After": "29"}  # one request per 30 s; 1 s already passed
    gate.authenticate("Bearer sk-beta-1", now=1)  # other tenants are not affected (no limit)
    gate.authenticate("Bearer sk-acme-1", now=30.01)


def test_tokens_per_min_charges_prompts_at_admission_and_completions_at_the_end():
    gate = _gate(default_tenant={"tokens_per_min": 600})  # 10 tokens/s
    acme = gate.authenticate("Bearer sk-acme-1", now=0)
    gate.admit_tokens(acme, 500, now=0)
    gate.settle(acme, 200, now=0)  # 600 - 700 = 100 tokens in debt
    with pytest.raises(Exception) as err:
        gate.admit_tokens(acme, 1, now=0)
    assert err.value.status == 429 and err.value.type == "tokens"
    assert err.value.headers == {"Retry-After": "11"}  # 101 tokens at 10/s
    gate.admit_tokens(acme, 1, now=10.2)


def test_limits_are_shared_among_ingress_replicas():
    args = {"models": [{"id": "m", "path": "p", "deployment": {"max_ongoing_requests": 1}}],
            "ingress": {"deployment": {"num_replicas": 4, "max_ongoing_requests": 8}},
            "auth": {"enabled": True, "default_tenant": {"requests_per_min": 8}}}
    gate = Gate.from_app(AppConfig.model_validate(args), environ=KEYS)
    gate.authenticate("Bearer sk-acme-1", now=0)
    gate.authenticate("Bearer sk-acme-1", now=0)
    with pytest.raises(Exception, match="Rate limit"):
        gate.authenticate("Bearer sk-acme-1", now=0)


def test_limits_follow_the_ingress_replicas_serve_reports_running():
    running = [None]
    cfg = AuthConfig.model_validate({"enabled": True, "default_tenant": {"requests_per_min": 12}})
    gate = Gate(cfg, load_keys(cfg, KEYS), share=2, on_reject=lambda *_: None, share_of=lambda: running[0])
    codes = []
    for now, n in ((0, None), (0, 3), (60, 3), (60, 1)):  # unknown: the config's 2 replicas, then Serve's count
        running[0] = n
        admitted = 0
        while True:
            try:
                gate.authenticate("Bearer sk-acme-1", now=now)
            except Exception:  # noqa: BLE001 - the 429
                break
            admitted += 1
        codes.append((gate.limits.share, admitted))
    # 12/min over 2 replicas: 6 each; over 3: 4 each (this bucket is empty), 4 a minute later; alone: 12, from
    # an empty bucket refilled at 12/min.
    assert codes == [(2, 6), (3, 0), (3, 4), (1, 0)]
    assert gate.limits.take_request("acme", 12, now=65) == 0  # 12/min alone: one per 5 s


def test_the_tenant_sets_the_cache_salt_and_a_client_can_only_narrow_it():
    assert Gate.cache_salt(None, "client") == "client"  # auth off: the client's own salt
    a, b = Tenant("acme", "acme"), Tenant("beta", "acme")
    assert Gate.cache_salt(a, None) == Gate.cache_salt(b, None) == "tenant:acme"  # one cache group
    assert Gate.cache_salt(Tenant("evil", "evil"), "tenant:acme") != "tenant:acme"
    assert Gate.cache_salt(a, "x") == "tenant:acme/x"


async def test_rotated_keys_are_picked_up_and_a_failed_reload_keeps_the_old_ones(tmp_path):
    f = tmp_path / "keys"
    f.write_text("acme:sk-old\n")
    cfg = AuthConfig(enabled=True, api_keys_env=None, api_keys_path=str(f), reload_s=5)
    gate = Gate(cfg, load_keys(cfg, {}))
    assert not gate.reload_due(0) and not gate.reload_due(4.9) and gate.reload_due(5)
    f.write_text("acme:sk-new\n")
    await gate.reload(5)
    assert gate.authenticate("Bearer sk-new", now=5).name == "acme"
    f.unlink()
    await gate.reload(10)
    assert gate.authenticate("Bearer sk-new", now=10).name == "acme"


def test_refusals_are_reported_by_reason_and_configured_tenant_never_by_key():
    seen = []
    gate = _gate(lambda *a: seen.append(a), tenants={"acme": {"requests_per_min": 1, "tokens_per_min": 60}})
    for header in (None, "Basic abc", "Bearer sk-nope", "Bearer sk-other"):
        with pytest.raises(Exception, match="API key"):
            gate.authenticate(header, now=0)
    acme = gate.authenticate("Bearer sk-acme-1", now=0)
    with pytest.raises(Exception, match="Rate limit"):
        gate.authenticate("Bearer sk-acme-1", now=1)
    gate.admit_tokens(acme, 100, now=1)
    with pytest.raises(Exception, match="Rate limit"):
        gate.admit_tokens(acme, 1, now=2)
    assert seen == [(401, "missing_key", "unknown"), (401, "missing_key", "unknown"), (401, "invalid_key", "unknown"),
                    (401, "invalid_key", "unknown"), (429, "requests_per_min", "acme"), (429, "tokens_per_min", "acme")]


def test_auth_metrics_are_declared_once_with_bounded_labels():
    m = metrics()
    assert (m.auth_rejected_requests._name, tuple(m.auth_rejected_requests._tag_keys)) == (
        "kvserve_auth_rejected_requests", ("reason", "tenant"))
    assert (m.rate_limited_requests._name, tuple(m.rate_limited_requests._tag_keys)) == (
        "kvserve_rate_limited_requests", ("reason", "tenant"))
    record_auth_rejection(401, "invalid_key", "sk-should-not-matter")  # records without a cluster


class _Counter:
    def __init__(self, name: str, seen: list) -> None:
        self.name, self.seen = name, seen

    def inc(self, value, tags):
        self.seen.append((self.name, tags["reason"], tags["tenant"], value))


def _record_metrics(monkeypatch) -> list:
    seen: list = []
    fake = SimpleNamespace(auth_rejected_requests=_Counter("auth_rejected_requests", seen),
                           rate_limited_requests=_Counter("rate_limited_requests", seen))
    monkeypatch.setattr(rejections, "metrics", lambda: fake)
    return seen


# --- in the ingress app (stub replica) --------------------------------------------------------------
AUTH_ON = {"auth": {"enabled": True, "tenants": {"acme": {"requests_per_min": 3}, "beta": {"cache_group": "ab"},
                                                 "gamma": {"cache_group": "ab"}}}}
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kvserve")


async def test_every_route_but_health_needs_a_key_before_its_body_is_read(monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEYS", KEYS["KVSERVE_API_KEYS"])
    app, _, handle = stub_ingress(monkeypatch, AUTH_ON)
    async with _client(app) as c:
        assert (await c.get("/health")).status_code == 200
        for r in (await c.get("/v1/models"), await c.post("/v1/chat/completions", content=b"{not json"),
                  await c.post("/v1/completions", json=CHAT, headers={"Authorization": "Bearer sk-wrong"})):
            assert r.status_code == 401, r.text
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            assert r.headers["www-authenticate"] == "Bearer"
        ok = await c.get("/v1/models", headers={"Authorization": "Bearer sk-beta-1"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "smollm2"
    assert handle.requests == []


async def test_the_ingress_counts_its_401s_and_429s(monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEYS", KEYS["KVSERVE_API_KEYS"])
    seen = _record_metrics(monkeypatch)
    app, _, _ = stub_ingress(monkeypatch, AUTH_ON)
    async with _client(app) as c:
        assert (await c.get("/v1/models")).status_code == 401
        assert (await c.get("/v1/models", headers={"Authorization": "Bearer sk-random-1"})).status_code == 401
        for _ in range(4):
            r = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-acme-1"})
    assert r.status_code == 429
    assert seen == [("auth_rejected_requests", "missing_key", "unknown", 1),
                    ("auth_rejected_requests", "invalid_key", "unknown", 1),
                    ("rate_limited_requests", "requests_per_min", "acme", 1)]


async def test_the_ingress_divides_limits_by_its_running_replicas(monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEYS", KEYS["KVSERVE_API_KEYS"])
    app, obj, _ = stub_ingress(monkeypatch, {"auth": {"enabled": True, "tenants": {"acme": {"requests_per_min": 6}}}})
    status = {StubHandle.deployment_name: SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 1}),
              INGRESS_DEPLOYMENT: SimpleNamespace(status="HEALTHY", replica_states={"RUNNING": 3})}
    obj._readiness.update(status, now=0)
    acme = {"Authorization": "Bearer sk-acme-1"}
    async with _client(app) as c:
        codes = [(await c.get("/v1/models", headers=acme)).status_code for _ in range(3)]
    assert codes == [200, 200, 429] and obj.gate.limits.share == 3  # 6/min over 3 replicas: 2 each


async def test_a_tenant_over_its_limit_gets_429_with_retry_after(monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEYS", KEYS["KVSERVE_API_KEYS"])
    app, _, _ = stub_ingress(monkeypatch, AUTH_ON)
    acme = {"Authorization": "Bearer sk-acme-1"}
    async with _client(app) as c:
        codes = [(await c.post("/v1/chat/completions", json=CHAT, headers=acme)).status_code for _ in range(3)]
        r = await c.post("/v1/chat/completions", json=CHAT, headers=acme)
        assert codes == [200, 200, 200] and r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
        other = await c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-beta-1"})
        assert other.status_code == 200


async def test_the_replica_gets_the_tenants_salt_whatever_the_client_sends(monkeypatch):
    monkeypatch.setenv("KVSERVE_API_KEYS", KEYS["KVSERVE_API_KEYS"] + ",gamma:sk-gamma-1")
    app, _, handle = stub_ingress(monkeypatch, AUTH_ON)
    async with _client(app) as c:
        for key, salt in (("sk-acme-1", "tenant:ab"), ("sk-beta-1", None), ("sk-gamma-1", None)):
            body = {**CHAT, "cache_salt": salt} if salt else CHAT
            r = await c.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200
    assert [r.cache_salt for r in handle.requests] == ["tenant:acme/tenant:ab", "tenant:ab", "tenant:ab"]


async def test_cached_tokens_and_the_replica_header_are_off_unless_configured_streamed_or_not(monkeypatch):
    for expose in (False, True):
        handle = StubHandle(cached_tokens=16)
        over = {"ingress": {"expose_cached_tokens": expose, "expose_replica_header": expose}}
        app, _, _ = stub_ingress(monkeypatch, over, handle)
        async with _client(app) as c:
            r = await c.post("/v1/chat/completions", json=CHAT)
            s = await c.post("/v1/completions", json={**CHAT, "prompt": "hi", "stream": True,
                                                      "stream_options": {"include_usage": True}})
        assert r.status_code == 200 and s.status_code == 200
        assert ("prompt_tokens_details" in r.json()["usage"]) is expose
        assert ("x-kvserve-replica" in r.headers) is expose
        assert ("x-kvserve-replica" in s.headers) is expose  # a stream names its replica too
        assert ('"cached_tokens":16' in s.text) is expose
        if expose:
            assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 16}
