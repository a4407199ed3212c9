"""A user's app run by ``uvicorn --workers N``: one pool under ``/api``, its balancer kept
to drain upstreams from a route, its zone named by ``RR_MIDDLEWARE_ZONE`` (what the docs
tell such a deployment to set). The upstreams come from ``ZONE_APP_UPSTREAMS``."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from rr_middleware import Balancer, Pool, RoundRobinMiddleware

balancer = Balancer({"/api": Pool(os.environ["ZONE_APP_UPSTREAMS"].split(","))})


async def drain(request: Request) -> JSONResponse:
    balancer["/api"].drain(request.query_params["url"])
    return JSONResponse({"pid": os.getpid()})


async def status(request: Request) -> JSONResponse:
    return JSONResponse(balancer.status())


app = Starlette(routes=[Route("/drain", drain, methods=["POST"]), Route("/status", status)])
app.add_middleware(RoundRobinMiddleware, balancer=balancer)
