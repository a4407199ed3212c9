"""TLS to upstreams from the gateway's file: real uvicorn upstreams serving certificates of
a CA made for the test (trustme), one of them requiring a client certificate."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from rr_middleware import TLS, Pool, Upstream
from rr_middleware.config_mapping import ConfigError
from rr_middleware.errors import FieldError
from rr_middleware.gateway import describe
from rr_middleware.gateway_config import load_config

from .gateway_process import run_gateway
from .servers import RunningServer, serve
from .upstream_app import UpstreamApp


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    named_cert: Path  # valid only for "api.internal"
    named_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    where = tmp_path_factory.mktemp("pki")
    ca, other = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    named = ca.issue_cert("api.internal")
    client = ca.issue_cert("rr-gateway-client")
    files = {
        "ca": ca.cert_pem,
        "other_ca": other.cert_pem,
        "server_cert": server.cert_chain_pems[0],
        "server_key": server.private_key_pem,
        "named_cert": named.cert_chain_pems[0],
        "named_key": named.private_key_pem,
        "client_cert": client.cert_chain_pems[0],
        "client_key": client.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        paths[name] = where / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    return Pki(**paths)


@pytest.fixture(scope="module")
def tls_upstreams(pki: Pki) -> Iterator[dict[str, RunningServer]]:
    with (
        serve(UpstreamApp("plain"), ssl_certfile=pki.server_cert, ssl_keyfile=pki.server_key) as a,
        serve(UpstreamApp("named"), ssl_certfile=pki.named_cert, ssl_keyfile=pki.named_key) as b,
        serve(
            UpstreamApp("mutual"),
            ssl_certfile=pki.server_cert,
            ssl_keyfile=pki.server_key,
            ssl_ca_certs=str(pki.ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
        ) as c,
    ):
        yield {"plain": a, "named": b, "mutual": c}


def https(server: RunningServer) -> str:
    return f"https://127.0.0.1:{server.port}"


def test_the_file_says_whom_to_trust_and_what_to_present(
    pki: Pki, tls_upstreams: dict[str, RunningServer], tmp_path: Path
) -> None:
    plain, named, mutual = (https(tls_upstreams[n]) for n in ("plain", "named", "mutual"))
    config = f"""
[server]
port = 0

[pools."/trusted"]
upstreams = ["{plain}"]
tls = {{ ca_file = "{pki.ca}" }}

[pools."/named"]          # reached by address, verified by name
upstreams = [{{ url = "{named}", tls = {{ ca_file = "{pki.ca}", server_name = "api.internal" }} }}]

[pools."/mutual"]
upstreams = ["{mutual}"]
[pools."/mutual".tls]
ca_file = "{pki.ca}"
cert_file = "{pki.client_cert}"
key_file = "{pki.client_key}"

[pools."/no-client-cert"]
upstreams = ["{mutual}"]
tls = {{ ca_file = "{pki.ca}" }}

[pools."/wrong-ca"]
upstreams = ["{plain}"]
tls = {{ ca_file = "{pki.other_ca}" }}

[pools."/system-cas"]      # no tls: the system's CAs, which never signed the test CA
upstreams = ["{plain}"]

[pools."/unverified"]
upstreams = ["{plain}"]
tls = {{ verify = false }}
"""
    with run_gateway(tmp_path, config) as gateway, httpx.Client(base_url=gateway.url) as client:
        for prefix, name in [
            ("/trusted", "plain"),
            ("/named", "named"),
            ("/mutual", "mutual"),
            ("/unverified", "plain"),
        ]:
            response = client.get(f"{prefix}/x")
            assert response.status_code == 200, (prefix, response.text)
            assert response.headers["x-upstream"] == name
        for prefix in ("/no-client-cert", "/wrong-ca", "/system-cas"):
            assert client.get(f"{prefix}/x").status_code == 502, prefix
        log = gateway.output()
    wrong_ca = [line for line in log.splitlines() if "pool /wrong-ca:" in line]
    assert len(wrong_ca) == 1, log
    assert f"GET {plain} failed (connect): TLS handshake failed" in wrong_ca[0]
    assert "CERTIFICATE_VERIFY_FAILED" in wrong_ca[0]
    # Under TLS 1.3 an upstream refuses a missing client certificate after the handshake,
    # with an alert that reaches the client as the connection closing.
    assert "pool /no-client-cert: GET" in log


def test_files_that_cannot_be_loaded_name_the_key_and_the_file(pki: Pki, tmp_path: Path) -> None:
    def mistake(tls: str) -> ConfigError:
        path = tmp_path / "gateway.toml"
        path.write_text(f'[pools."/api"]\nupstreams = ["https://a:1"]\ntls = {{ {tls} }}\n')
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        return caught.value

    error = mistake(f'ca_file = "{tmp_path}/missing.pem"')
    assert error.key == 'pools."/api".tls.ca_file'
    assert "missing.pem" in error.message
    assert "No such file" in error.message
    error = mistake(f'cert_file = "{pki.client_cert}", key_file = "{pki.server_key}"')
    assert error.key == 'pools."/api".tls.cert_file'
    assert str(pki.client_cert) in error.message
    error = mistake(f'cert_file = "{pki.client_cert}"')
    assert error.key == 'pools."/api".tls.cert_file'
    assert "key_file" in error.message


def test_tls_is_for_the_built_in_transport() -> None:
    transport = httpx.AsyncHTTPTransport()
    with pytest.raises(FieldError) as caught:
        Pool(["https://a:1"], transport=transport, tls=TLS(verify=False))
    assert caught.value.field == "tls"
    with pytest.raises(FieldError):
        Upstream("https://a:1", transport=transport, tls=TLS(verify=False))


def test_check_prints_the_tls_tables(pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        f'[pools."/api"]\nupstreams = [{{ url = "https://a:1", tls = {{ verify = false }} }}]\n'
        f'tls = {{ ca_file = "{pki.ca}" }}\n'
    )
    text = describe(load_config(path))
    assert f'[pools."/api".tls]\nca_file = "{pki.ca}"' in text
    assert '{ url = "https://a:1", weight = 1, tls = { verify = false } },' in text


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["pool", "upstream"])
async def test_a_reload_takes_the_new_contents_of_the_tls_files(
    pki: Pki, tls_upstreams: dict[str, RunningServer], tmp_path: Path, where: str
) -> None:
    """Certificates are renewed in place (the same paths, new contents): a reload then
    uses the new ones, as nginx's does, without a restart."""
    from asgi_lifespan import LifespanManager
    from starlette.applications import Starlette

    from rr_middleware import Balancer, RoundRobinMiddleware

    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(pki.other_ca.read_bytes())  # not yet the CA that signed it

    def pools() -> dict[str, Pool]:
        url, tls = https(tls_upstreams["plain"]), TLS(ca_file=str(ca_file))
        if where == "pool":
            return {"/api": Pool([url], tls=tls)}
        return {"/api": Pool([Upstream(url, tls=tls)])}

    balancer = Balancer(pools())
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/api/x")).status_code == 502
            ca_file.write_bytes(pki.ca.read_bytes())  # the CA file renewed in place
            await balancer.reconfigure(pools())
            response = await client.get("/api/x")
    assert response.status_code == 200
    assert response.headers["x-upstream"] == "plain"


async def test_a_reload_lets_go_of_the_connections_of_a_tls_no_pool_uses(
    pki: Pki, tls_upstreams: dict[str, RunningServer]
) -> None:
    """A reload removes the only pool with this TLS: the connection it kept idle closes
    at once, and the one carrying a request closes as soon as that request has its whole
    answer (before, both stayed open for as long as the upstream kept them)."""
    import asyncio

    from asgi_lifespan import LifespanManager
    from starlette.applications import Starlette

    from rr_middleware import Balancer, RoundRobinMiddleware

    from .leaks import held_sockets

    async def until(check: Callable[[], bool], what: str) -> None:
        """Poll ``check`` for 5 s, the loop running (a socket closes a turn after its
        abort; the upstream is in another thread)."""
        for _ in range(500):
            if check():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {what} within 5 s")

    async def until_held(count: int) -> None:
        await until(lambda: held_sockets(plain.port) == count, f"{count} connections")

    plain = tls_upstreams["plain"]
    pools = {"/api": Pool([https(plain)], tls=TLS(ca_file=str(pki.ca)))}
    balancer = Balancer(pools)
    app = RoundRobinMiddleware(Starlette(), balancer=balancer)
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            seen = len(plain.app.requests)
            slow = asyncio.ensure_future(client.get("/api/slow?action=sleep&s=1"))
            await until(lambda: len(plain.app.requests) > seen, "slow request upstream")
            assert (await client.get("/api/x")).status_code == 200  # a second connection
            assert held_sockets(plain.port) == 2  # one busy, one idle

            await balancer.reconfigure({"/else": Pool([https(plain)])})
            await until_held(1)  # the idle one closed at once
            assert not slow.done()
            response = await slow
            assert response.status_code == 200
            assert (response.headers["x-upstream"], response.content) == ("plain", b"slept")
            await until_held(0)  # the busy one once its answer was in
