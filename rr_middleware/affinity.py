"""Consistent hashing with bounded loads: which upstream a request's key belongs to.

``policy="hash"`` places every upstream on a ring of 64-bit points (Karger et al.'s
consistent hashing, as Envoy's ``RING_HASH`` and HAProxy's ``hash-type consistent``), a
number of points proportional to its effective weight: point ``i`` of an upstream is the
hash of its identity and ``i``, so it never moves, and a weight that grows (slow start)
only adds points. A key goes to the owner of the first point at or after the key's hash.
So removing one of N upstreams remaps only the keys that were on it (about 1/N), and
adding one takes about 1/(N+1) of the keys, all from the others, none moved between them.

Bounded load (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
Loads", 2017; HAProxy's ``hash-balance-factor``): an upstream may hold at most
``ceil(ceil(balance_factor * (in flight + 1)) * weight / total weight)`` requests in
flight, the in-flight count being the pool's, this one included. A key whose upstream is
full walks on along the ring to the next upstream below its bound; some always is, since
the bounds add up to more than the requests in flight. A hot key thus spills to its ring
neighbours instead of piling onto one upstream, and the other keys stay where they were.

The ring is built when the eligible set changes, never per request (each upstream's
points hashed once, kept sorted; a rebuild merges them), and holds at most ``MAX_POINTS``
points however many upstreams there are: a lookup is one bisect of at most 17 steps, in
C, whatever the size of the pool. Hashes are BLAKE2b, not Python's ``hash()`` (seeded per
process): every worker process and every replica maps a key to the same upstream.

``key_reader`` turns ``hash_on`` into the function reading a request's key: the client's
address, a header, a cookie or a query parameter (raw bytes, as the client sent them), or
a callable on the ASGI scope. A request without the key is picked by the pool's
``hash_fallback`` policy.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import struct
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from .balancing import Policy, _first_untried

__all__ = ["ConsistentHash", "HashRing", "PointCache", "key_hash", "key_reader"]

#: Ring points per unit of effective weight. A pool's effective weights are in tenths of
#: the configured one (slow start), so an upstream of weight 1 has 1,000 points: each
#: upstream's share of the keys is then within a few percent of its weight's.
POINTS_PER_TENTH = 1000
#: The most points a ring holds (a rebuild sorts them); past it every upstream gets
#: proportionally fewer, halving until they fit.
MAX_POINTS = 1 << 16
# A point keeps its owner's index in its low bits.
_OWNER_BITS = 20
_OWNER_MASK = (1 << _OWNER_BITS) - 1


class _Member(Protocol):
    @property
    def in_flight(self) -> int: ...


class _Load(Protocol):
    """The pool's requests in flight (``PoolLoad``), kept as they start and end."""

    in_flight: int


M = TypeVar("M", bound=_Member)


def key_hash(key: bytes) -> int:
    """The 64-bit hash of a key or a ring point: the same in every process."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


class PointCache:
    """Each upstream's ring points, by identity, hashed and sorted once while it stays
    (rings are rebuilt on every health or weight change: a rebuild then merges sorted
    lists). A point holds, in its low bits, the slot of its upstream here."""

    __slots__ = ("_free", "_hashes", "_sorted", "slots")

    def __init__(self) -> None:
        self.slots: dict[bytes, int] = {}
        self._free: list[int] = []
        self._hashes: dict[bytes, tuple[int, ...]] = {}
        self._sorted: dict[bytes, tuple[int, list[int]]] = {}

    def points(self, identity: bytes, count: int) -> list[int]:
        """The first ``count`` points of ``identity``, sorted, each ``hash << 20 | slot``.
        The points are SHAKE-128 of the identity read 8 bytes at a time: asking for more
        extends the sequence, so an upstream's first points never change."""
        cached = self._sorted.get(identity)
        if cached is not None and cached[0] == count:
            return cached[1]
        slot = self.slots.get(identity)
        if slot is None:
            slot = self._free.pop() if self._free else len(self.slots)
            if slot > _OWNER_MASK:
                raise RuntimeError("more than 2**20 upstreams in one pool's ring")
            self.slots[identity] = slot
        hashes = self._hashes.get(identity, ())
        if len(hashes) < count:
            stream = hashlib.shake_128(b"rr-ring\0" + identity).digest(8 * count)
            hashes = self._hashes[identity] = struct.unpack(f">{count}Q", stream)
        points = sorted(point << _OWNER_BITS | slot for point in hashes[:count])
        self._sorted[identity] = (count, points)
        return points

    def keep_only(self, identities: set[bytes]) -> None:
        """Forget the upstreams that left (discovery)."""
        for identity in [i for i in self.slots if i not in identities]:
            self._free.append(self.slots.pop(identity))
            self._hashes.pop(identity, None)
            self._sorted.pop(identity, None)


class HashRing(Generic[M]):
    """The ring of ``members`` (each ``identity``), points in proportion to ``weights``."""

    __slots__ = ("_index", "_members", "_points", "total", "weights")

    def __init__(
        self,
        members: Sequence[M],
        weights: Sequence[int],
        identities: Sequence[bytes],
        cache: PointCache,
    ) -> None:
        live = [(m, w, i) for m, w, i in zip(members, weights, identities, strict=True) if w > 0]
        self._members = [m for m, _, _ in live]
        self.weights = [w for _, w, _ in live]
        self.total = sum(self.weights)
        per_tenth = POINTS_PER_TENTH
        while per_tenth > 1 and self.total * per_tenth > MAX_POINTS:
            per_tenth //= 2
        lists = [cache.points(identity, max(1, w * per_tenth)) for _, w, identity in live]
        # Sorted runs: the sort merges them.
        self._points = sorted(itertools.chain.from_iterable(lists))
        #: A point's owner slot (its low bits) -> the owner's index in ``_members``.
        self._index = {cache.slots[identity]: index for index, (_, _, identity) in enumerate(live)}

    def __len__(self) -> int:
        return len(self._members)

    def reusable(self, members: Sequence[M], weights: Sequence[int]) -> bool:
        """Whether this ring is the one ``members`` with ``weights`` would build (most
        refreshes change nothing it holds)."""
        live = [(m, w) for m, w in zip(members, weights, strict=True) if w > 0]
        return len(live) == len(self._members) and all(
            m is mine and w == weight
            for (m, w), mine, weight in zip(live, self._members, self.weights, strict=True)
        )

    def position(self, point: int) -> int:
        """The index of the first ring point at or after ``point`` (wrapping): a bisect,
        at most 17 comparisons in C below ``MAX_POINTS``."""
        index = bisect_left(self._points, point << _OWNER_BITS)
        return index if index < len(self._points) else 0


class ConsistentHash(Generic[M]):
    """``policy="hash"``: ``pick_key(key, tried)`` the key's upstream on the ring, under
    the bounded load; ``pick(tried)`` (a request without a key) the ``fallback``'s."""

    __slots__ = ("balance_factor", "fallback", "load", "ring", "spills")

    def __init__(
        self,
        ring: HashRing[M],
        fallback: Policy[M],
        balance_factor: float | None,
        load: _Load,
    ) -> None:
        self.ring = ring
        self.fallback = fallback
        self.balance_factor = balance_factor
        self.load = load
        #: Keys sent past their own upstream because it was at its bound.
        self.spills = 0

    def pick(self, tried: Sequence[M] = ()) -> M | None:
        return self.fallback.pick(tried)

    def pick_key(self, key: bytes, tried: Sequence[M] = ()) -> M | None:
        ring = self.ring
        points = ring._points
        count = len(points)
        if not count:
            return None
        index_of = ring._index
        members = ring._members
        position = ring.position(key_hash(key))
        owner = index_of[points[position] & _OWNER_MASK]
        member = members[owner]
        factor = self.balance_factor
        if (factor is None or member.in_flight == 0) and not tried:
            return member  # the common case: its own upstream, idle or unbounded
        # HAProxy's chash_server_is_eligible: the pool's in flight, this one included.
        allowed = math.ceil((self.load.in_flight + 1) * factor) if factor is not None else 0
        total, weights = ring.total, ring.weights
        seen: set[int] = set()
        spilled = False
        for _ in range(count):  # along the ring, each member once
            if owner not in seen:
                seen.add(owner)
                member = members[owner]
                if not (tried and member in tried):
                    # in_flight < ceil(allowed * w / W), without dividing: in_flight is an
                    # integer, so it is below the ceiling exactly when below the quotient.
                    if factor is None or member.in_flight * total < allowed * weights[owner]:
                        if spilled:
                            self.spills += 1
                        return member
                    spilled = True
                if len(seen) == len(members):
                    break
            position = position + 1 if position + 1 < count else 0
            owner = index_of[points[position] & _OWNER_MASK]
        return _first_untried(members, tried) if tried else None


def key_reader(hash_on: str | Callable[[Any], Any]) -> Callable[[Any], bytes | None]:
    """The function reading a request's hash key from its ASGI scope (None: no key).

    ``"client"`` the client's address, ``"header:NAME"``, ``"cookie:NAME"``,
    ``"query:NAME"``, or a callable on the scope returning ``str``, ``bytes`` or None.
    Raises ValueError for anything else.
    """
    if callable(hash_on):
        return _from_callable(hash_on)
    if not isinstance(hash_on, str):
        raise ValueError(f"must be a string or a callable, got {hash_on!r}")
    if hash_on == "client":
        return _client
    kind, _, name = hash_on.partition(":")
    if not name or not name.isascii() or any(c in name for c in " ;=\t"):
        raise ValueError(
            "must be 'client', 'header:NAME', 'cookie:NAME', 'query:NAME' or a callable, "
            f"got {hash_on!r}"
        )
    raw = name.encode("ascii")
    if kind == "header":
        return _header_reader(raw.lower())
    if kind == "cookie":
        return _cookie_reader(raw)
    if kind == "query":
        return _query_reader(raw)
    raise ValueError(
        f"must be 'client', 'header:NAME', 'cookie:NAME', 'query:NAME' or a callable, "
        f"got {hash_on!r}"
    )


def _client(scope: Any) -> bytes | None:
    client = scope.get("client")
    return client[0].encode("ascii", "replace") if client else None


def _from_callable(function: Callable[[Any], Any]) -> Callable[[Any], bytes | None]:
    def read(scope: Any) -> bytes | None:
        key = function(scope)
        if key is None or isinstance(key, bytes):
            return key
        return str(key).encode("utf-8")

    return read


def _header_reader(name: bytes) -> Callable[[Any], bytes | None]:
    def read(scope: Any) -> bytes | None:
        for header, value in scope["headers"]:
            if header == name:
                return value  # type: ignore[no-any-return]
        return None

    return read


def cookie_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers (RFC 6265 §5.4:
    ``name=value`` pairs separated by ``;``), the first if repeated; None if absent."""
    for header, value in headers:
        if header != b"cookie" or name not in value:
            continue
        for pair in value.split(b";"):
            key, sep, found = pair.strip().partition(b"=")
            if sep and key == name:
                return found.strip(b'"')
    return None


def _cookie_reader(name: bytes) -> Callable[[Any], bytes | None]:
    def read(scope: Any) -> bytes | None:
        return cookie_value(scope["headers"], name)

    return read


def _query_reader(name: bytes) -> Callable[[Any], bytes | None]:
    prefix = name + b"="

    def read(scope: Any) -> bytes | None:
        query: bytes = scope.get("query_string", b"")
        if name not in query:
            return None
        for pair in query.split(b"&"):
            if pair.startswith(prefix):
                return pair[len(prefix) :]
            if pair == name:
                return b""
        return None

    return read
