"""Consistent hashing with bounded loads (``rr_middleware.affinity``), as pure code: the
spread of keys, what moves when upstreams leave or join, the bound on load, and the keys
read from a request. The same through real upstreams: ``tests/test_traffic.py``."""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Any

import pytest

from rr_middleware import Pool
from rr_middleware.affinity import ConsistentHash, HashRing, PointCache, key_reader
from rr_middleware.balancing import build
from rr_middleware.errors import FieldError

KEYS = [b"user-%d" % i for i in range(10_000)]


class Member:
    __slots__ = ("in_flight", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0

    def __repr__(self) -> str:
        return f"<{self.name} in_flight={self.in_flight}>"


class Load:
    in_flight = 0


def members(count: int, start: int = 0) -> list[Member]:
    return [Member(f"http://10.0.0.{i + 1}:8000") for i in range(start, start + count)]


def hashing(
    pool: list[Member],
    weights: list[int] | None = None,
    cache: PointCache | None = None,
    factor: float | None = 1.25,
    load: Load | None = None,
) -> ConsistentHash[Member]:
    # Effective weights are in tenths of the configured ones, as the pool's are.
    tenths = [10 * w for w in weights] if weights is not None else [10] * len(pool)
    ring = HashRing(pool, tenths, [m.name.encode() for m in pool], cache or PointCache())
    fallback = build("round_robin", pool, tenths, random.Random(0))
    return ConsistentHash(ring, fallback, factor, load or Load())


def placement(policy: ConsistentHash[Member]) -> dict[bytes, Member]:
    placed = {}
    for key in KEYS:
        member = policy.pick_key(key)
        assert member is not None
        placed[key] = member
    return placed


def test_keys_spread_within_ten_percent_of_equal_shares() -> None:
    counts = Counter(m.name for m in placement(hashing(members(5))).values())
    assert len(counts) == 5
    for count in counts.values():
        assert abs(count - 2000) <= 200, counts


def test_keys_spread_by_weight() -> None:
    pool = members(5)
    weights = [1, 1, 2, 2, 4]
    counts = Counter(m.name for m in placement(hashing(pool, weights)).values())
    for member, weight in zip(pool, weights, strict=True):
        share = len(KEYS) * weight / sum(weights)
        assert abs(counts[member.name] - share) <= 0.1 * share, (counts, weights)


def test_removing_one_of_five_moves_only_its_keys() -> None:
    pool = members(5)
    cache = PointCache()
    before = placement(hashing(pool, cache=cache))
    gone = pool[2]
    after = placement(hashing([m for m in pool if m is not gone], cache=cache))
    moved = [key for key in KEYS if after[key] is not before[key]]
    assert all(before[key] is gone for key in moved)
    assert len(moved) == sum(1 for m in before.values() if m is gone)
    assert len(moved) <= 1.3 * len(KEYS) / 5


def test_adding_a_sixth_moves_about_a_sixth_all_to_it() -> None:
    pool = members(5)
    cache = PointCache()
    before = placement(hashing(pool, cache=cache))
    newcomer = members(1, start=5)[0]
    after = placement(hashing([*pool, newcomer], cache=cache))
    moved = [key for key in KEYS if after[key] is not before[key]]
    assert all(after[key] is newcomer for key in moved)
    assert 0.7 * len(KEYS) / 6 <= len(moved) <= 1.3 * len(KEYS) / 6


def test_a_growing_weight_only_takes_keys() -> None:
    """Slow start: an upstream's points are a prefix of its full set, so as its weight
    grows it takes keys from the others and gives none back, nor do they trade keys."""
    pool = members(4)
    cache = PointCache()
    before = placement(hashing(pool, [1, 1, 1, 1], cache=cache))
    after = placement(hashing(pool, [1, 1, 1, 3], cache=cache))
    moved = [key for key in KEYS if after[key] is not before[key]]
    assert moved
    assert all(after[key] is pool[3] for key in moved)


def test_the_same_key_goes_to_the_same_upstream_in_any_process() -> None:
    first = placement(hashing(members(5)))
    again = placement(hashing(members(5)))  # new objects, new cache: only names in common
    assert all(first[key].name == again[key].name for key in KEYS)


def test_bounded_load_spills_a_hot_key() -> None:
    """One key, 100 requests in flight at once: no upstream holds more than its bound,
    ceil(ceil(1.25 * (in flight + 1)) * w / W), HAProxy's, so at most 25 of 100."""
    pool = members(5)
    load = Load()
    policy = hashing(pool, load=load)
    for _ in range(100):
        member = policy.pick_key(b"hot")
        assert member is not None
        member.in_flight += 1
        load.in_flight += 1
    loads = sorted(m.in_flight for m in pool)
    assert max(loads) <= math.ceil(1.25 * 100 / 5), loads
    assert sum(1 for n in loads if n) >= 4, loads
    assert policy.spills > 0


def test_bounded_load_keeps_cold_keys_home() -> None:
    """With every upstream below its bound, each key goes to its own upstream."""
    pool = members(5)
    load = Load()
    unbounded = placement(hashing(pool, factor=None))
    policy = hashing(pool, load=load)
    for member in pool:
        member.in_flight = 3
    load.in_flight = 15
    assert all(policy.pick_key(key) is unbounded[key] for key in KEYS[:500])
    assert policy.spills == 0


def test_no_bound_keeps_the_hot_key_on_one_upstream() -> None:
    pool = members(5)
    policy = hashing(pool, factor=None)
    picked = set()
    for _ in range(50):
        member = policy.pick_key(b"hot")
        assert member is not None
        member.in_flight += 1
        picked.add(member.name)
    assert len(picked) == 1


def test_a_retry_goes_to_the_next_upstream_on_the_ring() -> None:
    pool = members(5)
    policy = hashing(pool)
    first = policy.pick_key(b"k")
    assert first is not None
    second = policy.pick_key(b"k", [first])
    assert second is not None
    assert second is not first
    assert policy.pick_key(b"k", pool) is None


def test_an_empty_ring_picks_nothing() -> None:
    assert hashing([]).pick_key(b"k") is None


def test_a_request_without_a_key_goes_to_the_fallback() -> None:
    pool = members(3)
    policy = hashing(pool)
    assert [policy.pick() for _ in range(6)] == [*pool, *pool]  # round robin


SCOPE: dict[str, Any] = {
    "type": "http",
    "client": ("192.0.2.7", 5555),
    "headers": [
        (b"x-user", b"alice"),
        (b"cookie", b"theme=dark; session=abc123"),
        (b"cookie", b"other=1"),
    ],
    "query_string": b"a=1&tenant=acme&b",
}


@pytest.mark.parametrize(
    ("hash_on", "key"),
    [
        ("client", b"192.0.2.7"),
        ("header:X-User", b"alice"),
        ("header:x-missing", None),
        ("cookie:session", b"abc123"),
        ("cookie:other", b"1"),
        ("cookie:sess", None),
        ("query:tenant", b"acme"),
        ("query:b", b""),
        ("query:ten", None),
        (lambda scope: scope["headers"][0][1].decode().upper(), b"ALICE"),
        (lambda scope: None, None),
    ],
)
def test_keys_read_from_a_request(hash_on: Any, key: bytes | None) -> None:
    assert key_reader(hash_on)(SCOPE) == key


def test_no_client_address_is_no_key() -> None:
    assert key_reader("client")({**SCOPE, "client": None}) is None


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"policy": "hash"}, "hash_on"),
        ({"policy": "hash", "hash_on": "body"}, "hash_on"),
        ({"policy": "hash", "hash_on": "header:"}, "hash_on"),
        ({"policy": "hash", "hash_on": "cookie:a b"}, "hash_on"),
        ({"hash_on": "client"}, "hash_on"),
        ({"policy": "hash", "hash_on": "client", "hash_fallback": "hash"}, "hash_fallback"),
        ({"policy": "hash", "hash_on": "client", "balance_factor": 0.9}, "balance_factor"),
        ({"policy": "hash", "hash_on": "client", "balance_factor": True}, "balance_factor"),
        ({"policy": "hashed"}, "policy"),
    ],
)
def test_hash_options_are_validated(options: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as caught:
        Pool(["http://10.0.0.1:8000"], **options)
    assert caught.value.field == field


def test_hash_pool_defaults() -> None:
    pool = Pool(["http://10.0.0.1:8000"], policy="hash", hash_on="client")
    assert (pool.balance_factor, pool.hash_fallback) == (1.25, "round_robin")
    assert Pool(["http://a:1"], policy="hash", hash_on="client", balance_factor=None)
