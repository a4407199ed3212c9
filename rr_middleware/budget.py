"""A pool's retry budget: retries (and hedged requests) in flight may not exceed a fraction
of the requests active in the pool, with a floor, so that retries cannot multiply the load
on a pool that is already failing.

Envoy's semantics (``retry_budget``, PR #9069; Gateway API GEP-3388): with ``retries=2``
and no budget, an outage turns every request into three; with the default budget (20 % of
the active requests, and at least 3 retries at any time so a quiet pool may still retry),
the upstreams see at most about a quarter more attempts than requests, however many
retries each request may make. A retry the budget refuses is not made: the request fails
with the error (or the status) its last attempt had. The count is per worker process.
"""

from __future__ import annotations

__all__ = ["RetryBudget"]


class RetryBudget:
    """``admit()`` before a retry or a hedge (False: over budget, counted in
    ``refused``), ``release()`` once its attempt ended; ``active`` is the number of
    requests the pool is serving, kept by whoever serves them.

    >>> budget = RetryBudget(0.2, minimum=3)
    >>> budget.active = 40
    >>> [budget.admit() for _ in range(9)].count(True), budget.refused
    (8, 1)
    """

    __slots__ = ("active", "fraction", "minimum", "refused", "retrying")

    def __init__(self, fraction: float | None, minimum: int) -> None:
        #: None: no budget (every retry the pool's rules allow is made).
        self.fraction = fraction
        self.minimum = minimum
        self.active = 0
        self.retrying = 0  # retries and hedges in flight
        self.refused = 0  # retries and hedges not made for want of budget

    @property
    def limit(self) -> float:
        """Retries and hedges that may be in flight now (inf: no budget)."""
        fraction = self.fraction
        if fraction is None:
            return float("inf")
        return max(float(self.minimum), fraction * self.active)

    def admit(self) -> bool:
        """Take a place for one retry or hedge, if the budget has one."""
        fraction = self.fraction
        if fraction is not None:
            retrying = self.retrying
            if retrying >= self.minimum and retrying >= fraction * self.active:
                self.refused += 1
                return False
        self.retrying += 1
        return True

    def release(self) -> None:
        """The attempt of an admitted retry or hedge ended."""
        self.retrying -= 1
