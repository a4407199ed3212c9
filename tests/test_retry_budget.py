"""The retry budget (``Pool(retry_budget=0.2, retry_budget_min=3)``): retries in flight
limited to a fraction of the requests active in the pool, through real uvicorn upstreams
in an outage (every one answers 503, which ``retry_on_statuses`` retries).
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from rr_middleware import Pool
from rr_middleware.budget import RetryBudget
from rr_middleware.config import FieldError
from rr_middleware.gateway_config import load_config

from .proxy import aclient, running_proxy
from .slowable_upstream import SlowableUpstream, slowable_upstreams


def test_budget_admits_the_minimum_or_the_fraction_of_active_requests() -> None:
    budget = RetryBudget(0.2, minimum=3)
    assert [budget.admit() for _ in range(4)] == [True, True, True, False]  # idle: 3
    budget.active = 50  # 20 % of 50: 10 in flight
    assert [budget.admit() for _ in range(8)] == [True] * 7 + [False]
    assert (budget.retrying, budget.refused, budget.limit) == (10, 2, 10.0)
    budget.release()
    assert budget.admit()
    unlimited = RetryBudget(None, minimum=0)
    assert all(unlimited.admit() for _ in range(1000))
    assert unlimited.limit == math.inf


def test_config_and_toml(tmp_path: Path) -> None:
    assert (Pool(["http://a:1"]).retry_budget, Pool(["http://a:1"]).retry_budget_min) == (0.2, 3)
    for name, bad in (("retry_budget", -0.1), ("retry_budget", "20%"), ("retry_budget_min", -1)):
        with pytest.raises(FieldError) as caught:
            Pool(["http://a:1"], **{name: bad})
        assert caught.value.field == name
    path = tmp_path / "gateway.toml"
    path.write_text(
        '[pools."/a"]\nupstreams = ["http://10.0.0.1:8000"]\nretry_budget = 0.5\n'
        'retry_budget_min = 10\n[pools."/b"]\nupstreams = ["http://10.0.0.1:8000"]\n'
        "retry_budget = false\n"
    )
    pools = load_config(path).pools
    assert (pools["/a"].retry_budget, pools["/a"].retry_budget_min) == (0.5, 10)
    assert pools["/b"].retry_budget is None


def attempts(upstreams: list[SlowableUpstream]) -> int:
    return sum(app.seen for app in upstreams)


@pytest.mark.slow
@pytest.mark.anyio
async def test_an_outage_under_load_costs_a_budget_of_retries_not_three_times() -> None:
    """100 concurrent clients through ``retries=2``, each upstream answering 503 after
    100 ms (so the requests are in the proxy together, not queued in the test's client,
    and the fraction, not the minimum, is the limit):
    with the budget, retries are at most 20 % of the attempts in flight (Envoy's measure:
    of the active requests, which include those retrying), so the upstreams see at most
    1.25 attempts per request plus the minimum, with a margin for a loaded machine; with
    no budget, three each. One client alone retries every time: the minimum lets a quiet
    pool retry. No passive ejection (``max_fails=0``): the retries are the subject."""
    with slowable_upstreams(3) as (upstreams, urls):
        for app in upstreams:
            app.delay = 0.1
        outage = {"retries": 2, "retry_on_statuses": {503}, "max_fails": 0}
        pools = {
            "/budget": Pool(urls, **outage),
            "/unlimited": Pool(urls, **outage, retry_budget=None),
        }
        with running_proxy(pools) as (proxy, middleware):
            await outage_load(proxy.url, upstreams, middleware)


async def outage_load(proxy: str, upstreams: list[SlowableUpstream], middleware: Any) -> None:
    async with aclient() as http:

        async def load(prefix: str, clients: int, each: int) -> int:
            before = attempts(upstreams)

            async def client() -> None:
                for _ in range(each):
                    response = await http.get(f"{proxy}{prefix}/x?action=status&code=503")
                    assert response.status_code == 503

            await asyncio.gather(*(client() for _ in range(clients)))
            return attempts(upstreams) - before

        assert await load("/budget", 1, 10) == 30
        requests = 100 * 6
        budgeted = await load("/budget", 100, 6)
        unlimited = await load("/unlimited", 100, 6)
    budget = middleware.balancer["/budget"].budget
    print(
        f"{requests} requests: {budgeted} attempts with the budget "
        f"({budget.refused} retries refused), {unlimited} without"
    )
    assert unlimited == 3 * requests
    assert requests < budgeted <= 1.25 * requests + 3 + 0.1 * requests
    assert budget.refused > 0
    assert (budget.active, budget.retrying) == (0, 0)
