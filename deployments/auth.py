"""API keys, tenants and per-tenant rate limits of the ingress.

Owns: ``load_keys`` (the key -> tenant map from the environment and/or a mounted Secret),
``Gate`` (authenticates a request, admits it against its tenant's limits, settles the tokens it used,
and chooses its ``cache_salt``) and ``AuthMiddleware`` (the ASGI layer that
authenticates every route but ``/health`` before the body is read). Plain classes with ``now``
(monotonic seconds) as an argument. The ingress holds one ``Gate`` as its ``gate`` attribute, which
the middleware finds through Serve's replica context (as Serve finds the instance of a route); the
tenant of a request travels in ``request.state.kvserve_tenant``. Every refusal is reported to
``on_reject(status, reason, tenant)`` (by default ``rejections.record_auth_rejection``: the
``kvserve_auth_rejected_requests`` / ``kvserve_rate_limited_requests`` counters).

Keys are kept only as SHA-256 digests. The limits are ``deployments.rate_limits.TenantLimits``: each
ingress replica enforces its share of a tenant's limit (the limit / the running ingress replicas,
which ``share_of`` reports from Serve's status; see that module for why and what it trades).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from deployments.openai_api import APIError
from deployments.rate_limits import TenantLimits
from deployments.rejections import UNKNOWN_TENANT, record_auth_rejection
from serve_app.config import AppConfig, AuthConfig, ConfigError

logger = logging.getLogger(__name__)

TENANT_STATE = "kvserve_tenant"
OPEN_PATHS = frozenset({"/health"})


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who sent a request: the tenant its key belongs to, and the cache group it shares."""

    name: str
    cache_group: str


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(text: str, where: str) -> dict[str, str]:
    """``tenant:key`` entries (comma or newline separated; ``#`` lines are comments) -> {digest: tenant}."""
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("#"):
            continue
        for entry in filter(None, (e.strip() for e in line.split(","))):
            tenant, sep, key = entry.partition(":")
            if not sep or not tenant.strip() or not key.strip():
                raise ConfigError(f"{where}, line {n}: expected `tenant:key`, got an entry without both parts")
            out[_digest(key.strip())] = tenant.strip()
    return out


def _read_path(path: Path) -> dict[str, str]:
    if path.is_dir():  # a mounted Secret: one file per tenant (hidden entries are the kubelet's own)
        out: dict[str, str] = {}
        for f in sorted(path.iterdir()):
            if f.name.startswith(".") or not f.is_file():
                continue
            for key in filter(None, (k.strip() for k in f.read_text().splitlines())):
                out[_digest(key)] = f.name
        return out
    return parse_keys(path.read_text(), str(path))


def load_keys(cfg: AuthConfig, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every configured key as {sha256 digest: tenant}; ConfigError if a source is unreadable or malformed."""
    environ = os.environ if environ is None else environ
    keys: dict[str, str] = {}
    if cfg.api_keys_env and environ.get(cfg.api_keys_env):
        keys.update(parse_keys(environ[cfg.api_keys_env], f"${cfg.api_keys_env}"))
    if cfg.api_keys_path:
        try:
            keys.update(_read_path(Path(cfg.api_keys_path)))
        except OSError as err:
            raise ConfigError(f"auth.api_keys_path: cannot read {cfg.api_keys_path}: {err}") from None
    return keys


def _limited(kind: str, tenant: str, limit: int, wait_s: float) -> APIError:
    retry = max(1, math.ceil(wait_s))
    return APIError(429, f"Rate limit reached for {kind} per min of tenant {tenant} (limit {limit}). Please try "
                    f"again in {retry}s.", type_=kind, code="rate_limit_exceeded",
                    headers={"Retry-After": str(retry)})


class Gate:
    """Authentication, per-tenant limits and cache salts of one ingress replica."""

    def __init__(self, cfg: AuthConfig, keys: dict[str, str], share: int = 1,
                 on_reject: Callable[[int, str, str], None] = record_auth_rejection,
                 share_of: Callable[[], int | None] | None = None) -> None:
        """``share``: ingress replicas until ``share_of`` (Serve's running count, None while unknown) says."""
        self.cfg, self._keys = cfg, dict(keys)
        self.limits = TenantLimits(share)
        self._on_reject, self._share_of = on_reject, share_of
        self._next_reload: float | None = None
        self._reloading = False

    @classmethod
    def from_app(cls, app: AppConfig, environ: Mapping[str, str] | None = None,
                 share_of: Callable[[], int | None] | None = None) -> Gate:
        """The gate of an ingress replica; ConfigError when auth is on and no key is found."""
        cfg = app.auth
        keys = load_keys(cfg, environ) if cfg.enabled else {}
        if cfg.enabled and not keys:
            where = " or ".join(filter(None, (cfg.api_keys_env and f"${cfg.api_keys_env}", cfg.api_keys_path)))
            raise ConfigError(f"auth.enabled but no API key was found in {where}")
        dep = app.ingress.deployment
        share = dep.num_replicas or int((dep.autoscaling_config or {}).get("min_replicas", 1) or 1)
        if cfg.enabled:
            logger.info("API keys: %d key(s) for %d tenant(s); limits per ingress replica = limit / running "
                        "ingress replicas (%d until Serve reports)", len(keys), len(set(keys.values())), share)
        return cls(cfg, keys, share, share_of=share_of)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    # --- authentication -----------------------------------------------------------------------
    def authenticate(self, authorization: str | None, now: float) -> Tenant:
        """The tenant of an ``Authorization`` header value; APIError 401, or 429 past requests_per_min."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            self._on_reject(401, "missing_key", UNKNOWN_TENANT)
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an "
                           "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        name = self._keys.get(_digest(key.strip()))
        if name is None:
            self._on_reject(401, "invalid_key", UNKNOWN_TENANT)
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        t = self.cfg.tenant(name)
        if t.requests_per_min is not None:
            self._sync_share(now)
            wait = self.limits.take_request(name, t.requests_per_min, now)
            if wait > 0:
                self._on_reject(429, "requests_per_min", name)
                raise _limited("requests", name, t.requests_per_min, wait)
        return Tenant(name, t.cache_group or name)

    def _sync_share(self, now: float) -> None:
        """Divide the limits among the ingress replicas Serve last reported running (a dict read, no call)."""
        running = self._share_of() if self._share_of is not None else None
        if running and self.limits.set_share(running, now):
            logger.info("rate limits: %d ingress replicas running; each enforces limit / %d", running, running)

    # --- tokens -------------------------------------------------------------------------------
    def admit_tokens(self, tenant: Tenant | None, prompt_tokens: int, now: float) -> None:
        """Charge a request's prompt tokens; APIError 429 while the tenant is in debt."""
        if tenant is None:
            return
        limit = self.cfg.tenant(tenant.name).tokens_per_min
        if limit is None:
            return
        self._sync_share(now)
        wait = self.limits.take_tokens(tenant.name, limit, prompt_tokens, now)
        if wait > 0:
            self._on_reject(429, "tokens_per_min", tenant.name)
            raise _limited("tokens", tenant.name, limit, wait)

    def settle(self, tenant: Tenant | None, completion_tokens: int, now: float) -> None:
        """Charge the completion tokens a request produced (when it ends, whatever its outcome)."""
        if tenant is None or completion_tokens <= 0:
            return
        limit = self.cfg.tenant(tenant.name).tokens_per_min
        if limit is not None:
            self.limits.settle_tokens(tenant.name, limit, completion_tokens, now)

    # --- cache isolation ----------------------------------------------------------------------
    @staticmethod
    def cache_salt(tenant: Tenant | None, client_salt: str | None) -> str | None:
        """The request's ``cache_salt``: the tenant's cache group, then the client's own salt if it sent one.

        Without auth the client's salt is used as is. With auth a client can only narrow sharing within
        its group (a salt of its own), never join another group's cache.
        """
        if tenant is None:
            return client_salt
        group = f"tenant:{tenant.cache_group}"
        return f"{group}/{client_salt}" if client_salt else group

    # --- key rotation -------------------------------------------------------------------------
    def reload_due(self, now: float) -> bool:
        if not (self.cfg.enabled and self.cfg.api_keys_path) or self._reloading:
            return False
        if self._next_reload is None:
            self._next_reload = now + self.cfg.reload_s
        return now >= self._next_reload

    async def reload(self, now: float) -> None:
        """Re-read the keys (off the event loop); on failure keep the current ones."""
        self._reloading = True
        try:
            keys = await asyncio.to_thread(load_keys, self.cfg)
            if keys:
                self._keys = keys
            else:
                logger.warning("API key reload found no key; keeping the %d current key(s)", len(self._keys))
        except ConfigError as err:
            logger.warning("API key reload failed, keeping the current keys: %s", err)
        finally:
            self._reloading = False
            self._next_reload = now + self.cfg.reload_s


def tenant_of(request: Any) -> Tenant | None:
    """The tenant ``AuthMiddleware`` attached to a Starlette request (None when auth is off)."""
    return getattr(request.state, TENANT_STATE, None)


class AuthMiddleware:
    """ASGI middleware: Bearer authentication and requests/min before any route (and its body) runs."""

    def __init__(self, app: Any, gate_of: Callable[[], Gate | None] | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        import time

        self.app, self._gate_of, self._clock = app, gate_of or _replica_gate, clock or time.monotonic

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        gate = self._gate_of() if scope["type"] == "http" else None
        if gate is None or not gate.enabled or _relative_path(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        now = self._clock()
        if gate.reload_due(now):
            asyncio.get_running_loop().create_task(gate.reload(now))
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        try:
            tenant = gate.authenticate(headers.get("authorization"), now)
        except APIError as err:
            await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)
            return
        scope.setdefault("state", {})[TENANT_STATE] = tenant
        await self.app(scope, receive, send)


def _replica_gate() -> Gate | None:
    """The ``gate`` of the Serve replica's instance (the Ingress), found as Serve finds it for routes."""
    from ray import serve

    return getattr(serve.get_replica_context().servable_object, "gate", None)


def _relative_path(scope: dict[str, Any]) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
