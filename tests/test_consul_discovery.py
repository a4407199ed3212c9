"""Pools discovered from a real Consul agent (``consul agent -dev`` on loopback).

Services are registered with the agent, then deregistered, failed, re-weighted; the pool
must follow within a bounded time. Upstreams are real uvicorn servers, and the DNS tests
query the agent's own DNS interface. Consul's rules that a live agent cannot be made to
break on demand (an index going backwards, a churning service) are checked against
``httpx.MockTransport``, the seam a user testing their own Consul setup would use.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from pathlib import Path

import httpx
import pytest

from rr_middleware import ConsulDiscovery, DNSDiscovery, Pool, Upstream

from .consul_agent import ConsulAgent, find_consul, start_agent
from .polling import settled
from .proxy import InProcessProxy
from .servers import RunningServer, dead_url

pytestmark = pytest.mark.anyio

FOLLOW = 10.0  # seconds a pool may take to follow a change the agent has made


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def source(consul: ConsulAgent, service: str, **options: object) -> ConsulDiscovery:
    return ConsulDiscovery(
        service,
        address=consul.address,
        wait=5.0,
        min_interval=0.05,
        **options,  # type: ignore[arg-type]
    )


def register_passing(
    consul: ConsulAgent, service: str, server: RunningServer, **options: object
) -> str:
    """Register ``server`` as an instance of ``service`` with no service check (so it is
    passing from the start, and stays so when re-registered with other options)."""
    instance = f"{service}-{server.port}"
    consul.register(instance, service, "127.0.0.1", server.port, **options)  # type: ignore[arg-type]
    return instance


async def test_the_pool_follows_registrations(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, c = upstreams
    service = unique("users")
    ids = {s.app.name: register_passing(consul, service, s) for s in (a, b)}
    async with InProcessProxy(Pool(discovery=source(consul, service))) as proxy:
        # Startup waited for the agent's first answer: both are members at once.
        assert proxy.members() == sorted([a.url, b.url])
        assert sorted(await proxy.who(4)) == ["a", "a", "b", "b"]

        ids["c"] = register_passing(consul, service, c)
        await settled(lambda: len(proxy.members()) == 3, FOLLOW)
        assert sorted(await proxy.who(6)) == ["a", "a", "b", "b", "c", "c"]

        consul.deregister(ids["a"])
        await settled(lambda: proxy.members() == sorted([b.url, c.url]), FOLLOW)
        assert proxy.row(b.url)["requests"] == 4  # b stayed: its counters did too
        assert sorted(await proxy.who(2)) == ["b", "c"]

        consul.deregister(ids["b"])
        consul.deregister(ids["c"])
        await settled(lambda: proxy.members() == [], FOLLOW)
        response = await proxy.http.get("/api/x")
        assert response.status_code == 503
        assert "retry-after" in response.headers


async def test_a_failing_check_takes_an_instance_out(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, _ = upstreams
    service = unique("orders")
    register_passing(consul, service, a)
    registration = consul.register(f"{service}-b", service, "127.0.0.1", b.port, check_ttl="300s")
    assert registration.ttl_check_id is not None
    consul.pass_ttl(registration.ttl_check_id)
    async with InProcessProxy(Pool(discovery=source(consul, service))) as proxy:
        assert len(proxy.members()) == 2
        consul.fail_ttl(registration.ttl_check_id, "disk full")
        await settled(lambda: proxy.members() == [a.url], FOLLOW)
        assert await proxy.who(2) == ["a", "a"]
        consul.pass_ttl(registration.ttl_check_id)
        await settled(lambda: len(proxy.members()) == 2, FOLLOW)


async def test_http_checks_against_real_upstreams(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, _ = upstreams
    service = unique("web")
    for server in (a, b):
        consul.register(
            f"{service}-{server.app.name}",
            service,
            "127.0.0.1",
            server.port,
            check_http=f"{server.url}/health",
            check_interval="1s",
        )
    # Consul starts checks critical: the source waits (up to its startup_timeout) and the
    # members arrive as the agent's checks pass.
    async with InProcessProxy(Pool(discovery=source(consul, service))) as proxy:
        await settled(lambda: len(proxy.members()) == 2, FOLLOW)
        b.stop()  # the upstream goes away; Consul's check notices, then the pool
        await settled(lambda: proxy.members() == [a.url], FOLLOW)
        assert await proxy.who(3) == ["a", "a", "a"]


async def test_weights_come_from_meta_then_weights_passing(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, c = upstreams
    service = unique("weighted")
    register_passing(consul, service, a, meta={"weight": "3"}, weights={"Passing": 7})
    register_passing(consul, service, b, weights={"Passing": 2, "Warning": 1})
    register_passing(consul, service, c)
    async with InProcessProxy(Pool(discovery=source(consul, service))) as proxy:
        weights = {row["url"]: row["weight"] for row in proxy.pool.snapshot()}
        assert weights == {a.url: 3, b.url: 2, c.url: 1}
        picks = await proxy.who(12)
        assert (picks.count("a"), picks.count("b"), picks.count("c")) == (6, 4, 2)

        # Re-registering with another weight changes it in place.
        register_passing(consul, service, c, meta={"weight": "6"})
        await settled(lambda: proxy.row(c.url)["weight"] == 6, FOLLOW)
        assert proxy.row(c.url)["requests"] == 2


async def test_tag_filter_and_scheme_from_meta(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, _ = upstreams
    service = unique("tagged")
    register_passing(consul, service, a, tags=["v2"])
    register_passing(consul, service, b, tags=["v1"])
    consul.register(
        f"{service}-tls", service, "127.0.0.1", 443, tags=["v2"], meta={"scheme": "https"}
    )
    pool = Pool(discovery=source(consul, service, tag="v2"))
    async with InProcessProxy(pool) as proxy:
        assert proxy.members() == sorted([a.url, "https://127.0.0.1:443"])


async def test_passing_only_false_takes_failing_instances_too(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, _ = upstreams
    service = unique("all")
    register_passing(consul, service, a)
    consul.register(f"{service}-b", service, "127.0.0.1", b.port, check_ttl="300s")  # critical
    async with InProcessProxy(Pool(discovery=source(consul, service, passing_only=False))) as proxy:
        assert proxy.members() == sorted([a.url, b.url])


async def test_an_unreachable_agent_at_startup(caplog: pytest.LogCaptureFixture) -> None:
    address = dead_url()
    discovery = ConsulDiscovery("users", address=address, startup_timeout=0.3)
    with caplog.at_level(logging.WARNING, logger="rr_middleware"):
        async with InProcessProxy(Pool(discovery=discovery)) as proxy:
            assert (await proxy.http.get("/api/x")).status_code == 503
            assert (await proxy.http.get("/")).text == "host"
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"no upstreams from consul service 'users' at {address} within 0.3s" in error
    assert "unreachable" in error


async def test_an_agent_that_dies_later_leaves_the_last_members(
    upstreams: list[RunningServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An agent of this test's own, to kill.
    binary = find_consul()
    if binary is None:
        pytest.skip("consul agent not available")
    agent = start_agent(binary, tmp_path)
    try:
        a, b, _ = upstreams
        service = unique("kept")
        register_passing(agent, service, a)
        register_passing(agent, service, b)
        discovery = ConsulDiscovery(
            service, address=agent.address, wait=5.0, min_interval=0.05, retry_max=0.2
        )
        with caplog.at_level(logging.WARNING, logger="rr_middleware"):
            async with InProcessProxy(Pool(discovery=discovery)) as proxy:
                agent.stop()
                status = proxy.middleware.status
                await settled(lambda: status()["pools"][0]["discovery"]["error"], FOLLOW)
                assert proxy.members() == sorted([a.url, b.url])
                assert sorted(await proxy.who(4)) == ["a", "a", "b", "b"]
                assert "unreachable" in status()["pools"][0]["discovery"]["error"]
        assert "keeping the upstreams it last returned" in caplog.text
    finally:
        agent.stop()


# ------------------------------------------------------ Consul's rules, on a scripted API


def scripted_consul(indexes: list[int], seen: list[httpx.Request]) -> httpx.MockTransport:
    """Answers health queries with the next index of ``indexes`` (the last one forever),
    one instance whose port is the index."""

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        index = indexes[min(len(seen) - 1, len(indexes) - 1)]
        entry = {"Node": {"Address": "10.0.0.1"}, "Service": {"Port": 1000 + index}}
        return httpx.Response(200, headers={"X-Consul-Index": str(index)}, json=[entry])

    return httpx.MockTransport(answer)


async def follow(discovery: ConsulDiscovery, updates: int) -> list[list[Upstream]]:
    results = []
    async for members in discovery.watch():
        results.append(members)
        if len(results) == updates:
            break
    return results


async def test_the_index_resets_when_it_goes_backwards_and_never_blocks_on_0() -> None:
    seen: list[httpx.Request] = []
    transport = scripted_consul([10, 12, 5, 0, 7], seen)
    discovery = ConsulDiscovery("users", min_interval=0, transport=transport, token="s3cret")
    results = await follow(discovery, 5)
    assert [m[0].port for m in results] == [1010, 1012, 1005, 1000, 1007]
    assert results[0][0].url == "http://10.0.0.1:1010"  # no Service.Address: Node.Address
    sent = [request.url.params.get("index") for request in seen]
    # 12 -> 5 went backwards: the next query does not block; 0 is never sent as an index.
    assert sent == [None, "10", "12", None, "1"]
    assert all(request.headers["x-consul-token"] == "s3cret" for request in seen)
    assert all(request.url.params["passing"] == "true" for request in seen)
    assert seen[1].url.params["wait"] == "30000ms"


async def test_a_churning_service_cannot_make_the_loop_spin() -> None:
    seen: list[httpx.Request] = []
    transport = scripted_consul(list(range(1, 1000)), seen)  # a new index on every answer
    discovery = ConsulDiscovery("users", min_interval=0.1, transport=transport)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await follow(discovery, 4)
    elapsed = loop.time() - started
    assert len(seen) == 4
    assert elapsed >= 0.3  # three pauses of min_interval between four queries


async def test_consul_errors_are_discovery_errors() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, text="ACL not found")

    discovery = ConsulDiscovery("users", transport=httpx.MockTransport(refuse))
    with pytest.raises(Exception, match=r"consul answered 403 \(check the token's ACL\)"):
        await follow(discovery, 1)

    def garbage(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"X-Consul-Index": "3"}, text=json.dumps({"a": 1}))

    discovery = ConsulDiscovery("users", transport=httpx.MockTransport(garbage))
    with pytest.raises(Exception, match="consul answered no health list"):
        await follow(discovery, 1)


# ----------------------------------------------------------------- Consul's DNS interface


async def test_srv_records_from_consul_dns(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a, b, c = upstreams
    service = unique("srv")
    ids = [register_passing(consul, service, s) for s in (a, b, c)]
    discovery = DNSDiscovery(
        f"{service}.service.consul",
        port=None,
        interval=0.1,
        nameservers=[f"127.0.0.1:{consul.dns_port}"],
    )
    async with InProcessProxy(Pool(discovery=discovery)) as proxy:
        assert proxy.members() == sorted(s.url for s in (a, b, c))
        assert sorted(await proxy.who(3)) == ["a", "b", "c"]
        consul.deregister(ids[0])
        await settled(lambda: proxy.members() == sorted([b.url, c.url]), FOLLOW)


async def test_a_records_from_consul_dns(
    consul: ConsulAgent, upstreams: list[RunningServer]
) -> None:
    a = upstreams[0]
    service = unique("a-record")
    register_passing(consul, service, a)
    discovery = DNSDiscovery(
        f"{service}.service.consul",
        port=a.port,
        nameservers=[f"127.0.0.1:{consul.dns_port}"],
    )
    async with InProcessProxy(Pool(discovery=discovery)) as proxy:
        assert proxy.members() == [a.url]
        assert await proxy.who(1) == ["a"]
