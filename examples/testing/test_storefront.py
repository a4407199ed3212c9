"""Tests of the storefront (``storefront.py``) with rr-middleware's testing kit: fake
upstreams switched at run time, the pools' clock moved by hand, discovery driven by the
test, and no sleep anywhere. The fixtures ``fake_upstreams``, ``rr_clock`` and ``rr_app``
come from the kit's pytest plugin (``rr_middleware_fixtures = true`` in the pytest
configuration)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from storefront import create_app

from rr_middleware.testing import FakeDiscovery, FakeUpstream, ManualClock, RrTestClient
from rr_middleware.testing.plugin import FakeUpstreams, RrApp


@dataclass
class Shop:
    client: RrTestClient
    catalog: list[FakeUpstream]
    orders: list[FakeUpstream]
    registry: FakeDiscovery
    clock: ManualClock


@pytest.fixture
def shop(fake_upstreams: FakeUpstreams, rr_clock: ManualClock, rr_app: RrApp) -> Shop:
    catalog, orders = fake_upstreams(2), fake_upstreams(2)
    registry = FakeDiscovery(orders)
    app = create_app([f.upstream() for f in catalog], registry, clock=rr_clock)
    return Shop(rr_app(app=app), catalog, orders, registry, rr_clock)


def served_by(shop: Shop, count: int, path: str = "/catalog/items") -> list[str]:
    return [shop.client.get(path).json()["upstream"] for _ in range(count)]


def test_catalog_requests_take_turns(shop: Shop) -> None:
    assert served_by(shop, 4) == ["a", "b", "a", "b"]
    assert shop.catalog[0].requests[0].path == "/items"  # the prefix is stripped
    assert shop.client.get("/healthz").json() == {"status": "ok"}  # the app's own route


def test_a_dead_server_fails_over_without_a_client_error(shop: Shop) -> None:
    shop.catalog[1].refuse_connections()
    assert served_by(shop, 4) == ["a"] * 4


def test_a_failing_health_check_takes_a_server_out_and_back(shop: Shop) -> None:
    a = shop.catalog[0]
    a.fail_health_checks()
    shop.client.check_health("/catalog", rounds=2)  # fall=2
    assert served_by(shop, 3) == ["b"] * 3
    a.pass_health_checks()
    shop.client.check_health("/catalog", rounds=2)  # rise=2
    assert sorted(served_by(shop, 2)) == ["a", "b"]


def test_a_server_answering_503_is_ejected_until_fail_timeout(shop: Shop) -> None:
    a = shop.catalog[0]
    a.answer(503)
    assert served_by(shop, 4) == ["b"] * 4  # each 503 tried again on b; a is out after 2
    assert a.request_count == 2
    a.answer(200)
    shop.clock.advance(30)  # fail_timeout: a gets one request to prove itself
    assert sorted(served_by(shop, 2)) == ["a", "b"]


def test_a_slow_server_times_out(shop: Shop) -> None:
    shop.catalog[0].set_latency(3.0)  # longer than the pool's timeout of 1s
    assert shop.client.get("/catalog/items").status_code == 504  # a timeout is not retried
    assert served_by(shop, 1) == ["b"]


def test_a_post_is_not_sent_twice(shop: Shop) -> None:
    first, second = shop.orders
    first.reset_mid_body()
    response = shop.client.post("/orders/checkout", json={"cart": 7})
    assert response.status_code == 502
    assert [r.body for r in first.requests] == [b'{"cart":7}']
    assert second.request_count == 0  # not retried: the first may have taken the order


def test_new_order_servers_from_the_registry_take_traffic(
    shop: Shop, fake_upstreams: FakeUpstreams
) -> None:
    (newcomer,) = fake_upstreams(1)
    shop.registry.set([*shop.orders, newcomer])
    shop.client.wait_members("/orders", 3)
    served = {shop.client.get("/orders/mine").json()["upstream"] for _ in range(3)}
    assert served == {"c", "d", "e"}
    shop.registry.set([newcomer])
    shop.client.wait_members("/orders", 1)
    assert served_by(shop, 2, "/orders/mine") == ["e", "e"]
