"""How an upstream is picked for a request.

Equal weights: plain round robin, O(1) per pick. Unequal weights: nginx's smooth weighted
round robin (each pick adds every eligible upstream's weight to its current weight, takes
the largest and subtracts the total from the winner), so weights {5, 1, 1} give
``a a b a c a a`` rather than five ``a`` in a row. ``weight=0`` drains an upstream.
An upstream already tried for the request is never picked again for its retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, Protocol, TypeVar

__all__ = ["RoundRobin", "Weighted"]


class _Member(Protocol):
    @property
    def weight(self) -> int: ...


M = TypeVar("M", bound=_Member)


class RoundRobin(Generic[M]):
    """Pick members in turn; ``tried`` members are skipped."""

    def __init__(self, members: Sequence[M]) -> None:
        self._members = [m for m in members if m.weight > 0]
        self._next = 0

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        members = self._members
        count = len(members)
        for _ in range(count):
            index = self._next
            self._next = index + 1 if index + 1 < count else 0
            member = members[index]
            if not tried or member not in tried:
                return member
        return None


class Weighted(Generic[M]):
    """nginx's smooth weighted round robin over the members' weights."""

    def __init__(self, members: Sequence[M]) -> None:
        self._members = list(members)
        self._current = [0] * len(self._members)

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        current = self._current
        total = 0
        best = -1
        for index, member in enumerate(self._members):
            weight = member.weight
            if weight <= 0 or (tried and member in tried):
                continue
            current[index] += weight
            total += weight
            if best < 0 or current[index] > current[best]:
                best = index
        if best < 0:
            return None
        current[best] -= total
        return self._members[best]


def balancer_for(members: Sequence[M]) -> RoundRobin[M] | Weighted[M]:
    """Plain round robin when all live weights are equal, smooth weighted otherwise."""
    weights = {m.weight for m in members if m.weight > 0}
    return RoundRobin(members) if len(weights) <= 1 else Weighted(members)
