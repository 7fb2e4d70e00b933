"""Per-tenant rate limits of one ingress replica, sized so that together they hold cluster-wide.

Owns: ``TokenBucket`` (units refilled continuously; it may go into debt for post-paid charges) and
``TenantLimits`` (each tenant's requests/min and tokens/min buckets on this replica, at its share of
the tenant's limit). Pure: ``now`` (monotonic seconds) is an argument; no I/O, no clock.

Cluster-wide without a hop per request. Serve's proxies spread requests over the N running ingress
replicas, and each replica enforces ``limit / N`` (its *share*), so the shares add up to the tenant's
limit. N is Serve's count of RUNNING replicas of the ingress deployment, which the ingress already
reads about every second for readiness (``deployments.readiness``: ``serve.status()`` on a thread);
until the first report it is the config's ``num_replicas`` (``min_replicas`` when autoscaled). When N
changes every bucket is resized to the new share: a level above the new capacity is cut to it, a debt
is kept.

Trade-offs, against one counter in an actor (a call on every request) or leases granted in batches
(an actor, and a call per batch):

* The limit holds as far as the proxies spread each tenant's requests evenly. A tenant whose requests
  pile onto one replica is refused at limit / N there while the cluster is under its limit: this
  errs on the strict side, never above the limit. Small limits over many replicas make that likely
  (10 requests/min over 5 replicas: 2/min, bursts of 2, per replica).
* N lags Serve by the readiness refresh plus the controller's own view. For that long after a
  scale-up the old, larger shares add up to more than the limit (x N_new / N_old), and a new replica
  starts with a full bucket; after a scale-down the shares add up to less.
* Tokens-per-min debts (completion tokens are charged when a request ends) stay on the replica that
  served the request.
"""

from __future__ import annotations


class TokenBucket:
    """A bucket of ``per_min`` units refilled continuously; it may go into debt (post-paid charges)."""

    def __init__(self, per_min: float, now: float) -> None:
        self.capacity = per_min
        self.rate = per_min / 60.0
        self.level = per_min
        self._t = now

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + max(now - self._t, 0.0) * self.rate)
        self._t = max(now, self._t)

    def wait_s(self, need: float, now: float) -> float:
        """Seconds until ``need`` units are available (0 = now)."""
        self._refill(now)
        need = min(need, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def charge(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def resize(self, per_min: float, now: float) -> None:
        """Refill at the old rate until ``now``, then hold ``per_min``: the level is cut to the new capacity, a
        debt is kept."""
        self._refill(now)
        self.capacity, self.rate = per_min, per_min / 60.0
        self.level = min(self.level, per_min)


class TenantLimits:
    """This replica's share of every tenant's requests/min and tokens/min (the limit / ``share``)."""

    def __init__(self, share: int = 1) -> None:
        self._share = max(int(share), 1)
        self._requests: dict[str, TokenBucket] = {}  # one per tenant seen (tenants are bounded by the keys)
        self._tokens: dict[str, TokenBucket] = {}

    @property
    def share(self) -> int:
        """How many ingress replicas the limits are divided among."""
        return self._share

    def set_share(self, replicas: int, now: float) -> bool:
        """Divide the limits among ``replicas`` from now on; True when that changed the share."""
        n = max(int(replicas), 1)
        if n == self._share:
            return False
        for buckets in (self._requests, self._tokens):
            for b in buckets.values():
                b.resize(b.capacity * self._share / n, now)
        self._share = n
        return True

    def take_request(self, tenant: str, per_min: int, now: float) -> float:
        """Admit one request: 0 (and charged), or the seconds until this replica's share admits one."""
        bucket = self._bucket(self._requests, tenant, per_min, now)
        wait = bucket.wait_s(1, now)
        if wait == 0:
            bucket.charge(1, now)
        return wait

    def take_tokens(self, tenant: str, per_min: int, tokens: int, now: float) -> float:
        """Admit a request's prompt ``tokens``: 0 (and charged; any credit admits, the request may overdraw it),
        or the seconds until the tenant's debt on this replica is paid back."""
        bucket = self._bucket(self._tokens, tenant, per_min, now)
        wait = bucket.wait_s(1, now)
        if wait == 0:
            bucket.charge(tokens, now)
        return wait

    def settle_tokens(self, tenant: str, per_min: int, tokens: int, now: float) -> None:
        """Charge tokens a request used after its admission (its completion)."""
        self._bucket(self._tokens, tenant, per_min, now).charge(tokens, now)

    def _bucket(self, buckets: dict[str, TokenBucket], tenant: str, per_min: int, now: float) -> TokenBucket:
        b = buckets.get(tenant)
        if b is None:
            b = buckets[tenant] = TokenBucket(per_min / self._share, now)
        return b
