"""The real Consul agent the discovery tests rely on: checks, health view, blocking queries, DNS.

These pin down the Consul behaviour that service discovery builds on, against a live
``consul agent -dev`` (the ``consul`` fixture), so a change of agent shows up here first.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from .consul_agent import ConsulAgent, Entry
from .servers import serve
from .upstream_app import UpstreamApp


def ports(entries: list[Entry]) -> set[int]:
    return {entry["Service"]["Port"] for entry in entries}


def check(entry: Entry, check_id: str | None) -> Entry:
    found: Entry = {c["CheckID"]: c for c in entry["Checks"]}[check_id]
    return found


def poll(read: Callable[[], str], timeout: float = 15.0) -> str:
    """``read()`` once it returns something non-empty, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := read()):
        assert time.monotonic() < deadline, f"nothing read in {timeout}s"
        time.sleep(0.05)
    return value


def test_http_check_against_a_real_upstream(consul: ConsulAgent) -> None:
    with serve(UpstreamApp("a")) as upstream:
        ok = consul.register(
            "http-ok", "http-checked", "127.0.0.1", upstream.port, check_http=f"{upstream.url}/ok"
        )
        bad = consul.register(
            "http-503",
            "http-checked",
            "127.0.0.2",
            upstream.port,
            check_http=f"{upstream.url}/bad?action=status&code=503",
        )
        # Consul starts a new check critical: passing only once it has probed the upstream
        # (which it may have done already: the services are read before the requests).
        early = consul.services("http-checked", passing=True)
        assert early == [] or any(r["raw_path"] == "/ok" for r in upstream.app.requests)

        entries = consul.wait_for("http-checked", lambda e: len(e) == 1, passing=True)

        assert entries[0]["Service"]["ID"] == "http-ok"
        assert check(entries[0], ok.http_check_id)["Status"] == "passing"
        probes = [r for r in upstream.app.requests if r["raw_path"] == "/ok"]
        assert probes, "the agent never sent its HTTP check to the upstream"
        assert ["user-agent", "Consul Health Check"] in probes[0]["headers"]

        # The 503 instance was probed too. A check that stays critical syncs its new output
        # to the catalog only after check_update_interval (5 min): read it from the agent.
        agent_checks = "/v1/agent/checks"
        output = poll(lambda: consul.client.get(agent_checks).json()[bad.http_check_id]["Output"])
        assert "503 Service Unavailable" in output
        [failed] = [e for e in consul.services("http-checked") if e["Service"]["ID"] == "http-503"]
        assert check(failed, bad.http_check_id)["Status"] == "critical"


def test_failing_ttl_check_removes_the_instance_from_the_passing_list(
    consul: ConsulAgent,
) -> None:
    first = consul.register("ttl-1", "ttl-checked", "127.0.0.1", 9101, check_ttl="60s")
    second = consul.register("ttl-2", "ttl-checked", "127.0.0.1", 9102, check_ttl="60s")
    assert first.ttl_check_id is not None
    assert second.ttl_check_id is not None
    consul.pass_ttl(first.ttl_check_id)
    consul.pass_ttl(second.ttl_check_id)
    consul.wait_for("ttl-checked", lambda e: ports(e) == {9101, 9102}, passing=True)

    consul.fail_ttl(second.ttl_check_id, note="draining")

    consul.wait_for("ttl-checked", lambda e: ports(e) == {9101}, passing=True)
    # Still registered, just critical: the unfiltered view keeps it with its check's note.
    everything = {e["Service"]["Port"]: e for e in consul.services("ttl-checked")}
    assert set(everything) == {9101, 9102}
    failed = check(everything[9102], second.ttl_check_id)
    assert (failed["Status"], failed["Output"]) == ("critical", "draining")


def test_deregister_removes_the_instance(consul: ConsulAgent) -> None:
    consul.register("gone-1", "deregistered", "127.0.0.1", 9201)
    consul.register("gone-2", "deregistered", "127.0.0.1", 9202)
    assert ports(consul.services("deregistered")) == {9201, 9202}

    consul.deregister("gone-1")

    assert ports(consul.services("deregistered")) == {9202}


def test_tags_meta_and_weights_come_back_in_the_health_view(consul: ConsulAgent) -> None:
    consul.register(
        "described-1",
        "described",
        "127.0.0.1",
        9301,
        tags=("blue", "v2"),
        meta={"zone": "a"},
        weights={"Passing": 5, "Warning": 1},
    )
    consul.register("described-2", "described", "127.0.0.1", 9302)

    by_port = {e["Service"]["Port"]: e["Service"] for e in consul.services("described")}

    assert by_port[9301]["Tags"] == ["blue", "v2"]
    assert by_port[9301]["Meta"] == {"zone": "a"}
    assert by_port[9301]["Weights"] == {"Passing": 5, "Warning": 1}
    assert by_port[9302]["Weights"] == {"Passing": 1, "Warning": 1}  # Consul's default


def test_blocking_query_returns_when_the_service_changes(consul: ConsulAgent) -> None:
    consul.register("watched-1", "watched", "127.0.0.1", 9401)
    index, entries = consul.watch("watched")
    assert ports(entries) == {9401}
    results: queue.Queue[tuple[int, list[Entry], float]] = queue.Queue()

    def watch() -> None:
        started = time.monotonic()
        new_index, new_entries = consul.watch("watched", index=index, wait="30s")
        results.put((new_index, new_entries, time.monotonic() - started))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    consul.register("watched-2", "watched", "127.0.0.1", 9402)
    new_index, new_entries, elapsed = results.get(timeout=30)
    watcher.join(timeout=5)

    assert new_index > index
    assert ports(new_entries) == {9401, 9402}
    assert elapsed < 30  # woken by the change, not by the wait running out


def test_blocking_query_without_a_change_waits_and_keeps_the_index(consul: ConsulAgent) -> None:
    consul.register("quiet-1", "quiet", "127.0.0.1", 9501)
    index, _ = consul.watch("quiet")

    started = time.monotonic()
    same_index, entries = consul.watch("quiet", index=index, wait="1s")

    assert time.monotonic() - started >= 0.9
    assert same_index == index
    assert ports(entries) == {9501}


def query(consul: ConsulAgent, name: str, rdtype: str) -> dns.message.Message:
    request = dns.message.make_query(name, rdtype)
    return dns.query.udp(request, "127.0.0.1", port=consul.dns_port, timeout=5)


def test_dns_answers_srv_and_a_for_passing_instances_only(consul: ConsulAgent) -> None:
    up = consul.register("dns-1", "dns-web", "127.0.0.1", 9601, weights={"Passing": 3})
    down = consul.register("dns-2", "dns-web", "127.0.0.2", 9602, check_ttl="60s")
    assert up.ttl_check_id is None
    assert down.ttl_check_id is not None
    # dns-2's TTL check starts critical, and Consul's DNS leaves critical instances out.

    srv = query(consul, "dns-web.service.consul", "SRV")
    assert srv.rcode() == dns.rcode.NOERROR
    records = [r for rrset in srv.answer for r in rrset if r.rdtype == dns.rdatatype.SRV]
    assert [(r.port, r.weight) for r in records] == [(9601, 3)]
    # The target's address comes along in the additional section.
    glue = [
        r.address
        for rrset in srv.additional
        if rrset.name == records[0].target
        for r in rrset
        if r.rdtype == dns.rdatatype.A
    ]
    assert glue == ["127.0.0.1"]

    consul.pass_ttl(down.ttl_check_id)
    consul.wait_for("dns-web", lambda e: len(e) == 2, passing=True)
    srv = query(consul, "dns-web.service.consul", "SRV")
    ports_in_dns = {r.port for rrset in srv.answer for r in rrset}
    assert ports_in_dns == {9601, 9602}

    a = query(consul, "dns-web.service.consul", "A")
    assert {r.address for rrset in a.answer for r in rrset} == {"127.0.0.1", "127.0.0.2"}


def test_dns_answers_nxdomain_for_an_unknown_service(consul: ConsulAgent) -> None:
    assert query(consul, "no-such-service.service.consul", "SRV").rcode() == dns.rcode.NXDOMAIN
