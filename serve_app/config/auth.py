"""API keys, tenants and their limits: the ``auth`` section of the application config.

Owns: ``AuthConfig`` and ``TenantConfig``. The keys themselves never appear in the YAML: the config
names where they come from, an environment variable (``api_keys_env``) and/or a file or directory
(``api_keys_path``, typically a Kubernetes Secret mounted into the ingress pods). The key format is
read by ``deployments.auth.load_keys``:

- environment variable or file: ``tenant:key`` entries, one per line or separated by commas
  (``#`` starts a comment line);
- directory (a mounted Secret): each file is one tenant, named like the file, holding its key(s),
  one per line (``kubectl create secret generic kvserve-api-keys --from-literal=acme=sk-...``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class TenantConfig(BaseModel):
    """Limits and cache sharing of one tenant (or the defaults of tenants not listed)."""

    model_config = ConfigDict(extra="forbid")

    requests_per_min: int | None = Field(
        default=None, ge=1, description="Requests per minute across the cluster (each running ingress replica "
        "enforces its share, see deployments/rate_limits.py); beyond it 429 with Retry-After. None = no limit.")
    tokens_per_min: int | None = Field(
        default=None, ge=1,
        description="Prompt + completion tokens per minute. Prompt tokens are charged when a request is admitted, "
        "completion tokens when it ends; a tenant in debt gets 429 with Retry-After until it is paid back.")
    cache_group: str | None = Field(
        default=None, pattern=_NAME,
        description="Tenants with the same cache_group share the prefix cache and the KV tier; unset = the tenant's "
        "own name (isolated).")


class AuthConfig(BaseModel):
    """Bearer API keys on every route but /health; each key maps to a tenant."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=False, description="Require `Authorization: Bearer <key>` on every route but /health (401 otherwise).")
    api_keys_env: str | None = Field(
        default="KVSERVE_API_KEYS", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable of the ingress holding `tenant:key` entries (comma or newline separated). "
        "Unset or empty in the environment = no keys from it.")
    api_keys_path: str | None = Field(
        default=None,
        description="File of `tenant:key` lines, or directory with one file per tenant holding its keys (a mounted "
        "Kubernetes Secret). Read when the ingress starts and again every reload_s.")
    reload_s: float = Field(
        default=30.0, gt=0, description="Seconds between re-reads of api_keys_path (rotated Secrets take effect).")
    tenants: dict[str, TenantConfig] = Field(
        default_factory=dict, description="Per-tenant limits and cache sharing, by tenant name.")
    default_tenant: TenantConfig = Field(
        default_factory=TenantConfig, description="Limits of tenants that have keys but no entry in `tenants`.")

    @model_validator(mode="after")
    def _names(self) -> AuthConfig:
        import re

        bad = sorted(n for n in self.tenants if not re.match(_NAME, n))
        if bad:
            raise ValueError(f"auth.tenants: invalid tenant name(s) {bad} (letters, digits, '.', '_', '-')")
        if self.enabled and not (self.api_keys_env or self.api_keys_path):
            raise ValueError("auth.enabled needs api_keys_env or api_keys_path (where the keys come from)")
        return self

    def tenant(self, name: str) -> TenantConfig:
        """The settings of tenant ``name`` (the defaults when it is not listed)."""
        return self.tenants.get(name, self.default_tenant)
