"""The compose file's backend: the demo backend that registers itself with Consul.

On startup it registers ``<SERVICE_NAME>`` at its own address with an HTTP check on
``/health`` (retrying until the agent answers: containers start in any order), and
deregisters on shutdown, so the gateway's Consul pool follows ``docker compose up
--scale backend=N`` and ``docker compose stop``.

Environment: ``CONSUL_HTTP_ADDR`` (default ``http://consul:8500``), ``SERVICE_NAME``
(``backend``), ``SERVICE_ADDRESS`` (default: this host's address), ``SERVICE_PORT``
(``8000``), ``BACKEND_NAME`` (default: the host name).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from examples.demo_backend import make_app

logger = logging.getLogger("backend")

CONSUL = os.environ.get("CONSUL_HTTP_ADDR", "http://consul:8500")
SERVICE = os.environ.get("SERVICE_NAME", "backend")
PORT = int(os.environ.get("SERVICE_PORT", "8000"))
NAME = os.environ.get("BACKEND_NAME") or socket.gethostname()


def _own_address() -> str:
    return os.environ.get("SERVICE_ADDRESS") or socket.gethostbyname(socket.gethostname())


async def _register(consul: httpx.AsyncClient, instance: str, address: str) -> None:
    registration = {
        "ID": instance,
        "Name": SERVICE,
        "Address": address,
        "Port": PORT,
        "Meta": {"backend": NAME},
        "Check": {
            "HTTP": f"http://{address}:{PORT}/health",
            "Interval": "2s",
            "Timeout": "1s",
            "DeregisterCriticalServiceAfter": "1m",
        },
    }
    for attempt in range(60):  # about a minute for the agent to come up
        try:
            response = await consul.put("/v1/agent/service/register", json=registration)
            response.raise_for_status()
            logger.warning("registered %s at %s:%d with %s", instance, address, PORT, CONSUL)
            return
        except httpx.HTTPError as exc:
            logger.warning("consul not ready (%s); retrying (%d)", exc, attempt + 1)
            await asyncio.sleep(1)
    raise RuntimeError(f"could not register with consul at {CONSUL}")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    address = _own_address()
    instance = f"{SERVICE}-{address}-{PORT}"
    async with httpx.AsyncClient(base_url=CONSUL, timeout=5, trust_env=False) as consul:
        await _register(consul, instance, address)
        try:
            yield
        finally:
            try:
                await consul.put(f"/v1/agent/service/deregister/{instance}")
            except httpx.HTTPError as exc:
                logger.warning("could not deregister %s: %s", instance, exc)


app = make_app(NAME)
app.router.lifespan_context = lifespan
