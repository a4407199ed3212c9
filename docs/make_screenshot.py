"""Render the status page of a small demo for the README: docs/status-page.png.

    .venv/bin/python docs/make_screenshot.py [OUTPUT.png]

Three demo backends run under uvicorn on 127.0.0.1 (ephemeral ports) behind one pool,
``/api``, which the middleware (under uvicorn too) serves with ``status_path="/status"``.
backend-2 weighs 3; backend-3 is stopped after some traffic, and the pool's health check
marks it down. Headless Chromium then renders the page, after its script has refreshed
the table from the JSON. tests/test_observability.py runs this script too, writing the
picture to a temporary directory instead. The Chromium runner is the page tests' own
(tests/chromium.py); ``CHROMIUM=path`` names another binary.
"""

from __future__ import annotations

import json
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

# This checkout first: its rr_middleware, and tests/chromium.py, shared with the page tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rr_middleware import HealthCheck, Pool, RoundRobinMiddleware, Upstream
from tests.chromium import CHROMIUM, run_chromium

WINDOW_SIZE = (1100, 330)


def backend(name: str) -> Any:
    """A demo backend: JSON naming itself; ``?fail=1`` answers 503."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body", False):
            pass
        status = 503 if b"fail=1" in scope["query_string"] else 200
        body = json.dumps({"backend": name, "path": scope["path"]}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class Server:
    """uvicorn in a thread, on a socket bound before it starts (its URL is known at once,
    and connections made before it is ready wait in the backlog)."""

    def __init__(self, app: Any, lifespan: str) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(128)
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan)
        self.server = uvicorn.Server(config)
        self.stopped = False
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():
            raise RuntimeError(f"the server at {self.url} did not stop")
        self.socket.close()


@contextmanager
def running(app: Any, lifespan: str = "off") -> Iterator[Server]:
    server = Server(app, lifespan)
    try:
        yield server
    finally:
        server.stop()


def wait_for_state(http: httpx.Client, url: str, state: str, timeout: float = 15.0) -> None:
    """Poll the status JSON until the upstream ``url`` is in ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        status = http.get("/status.json").json()
        states = {u["url"]: u["state"] for p in status["pools"] for u in p["upstreams"]}
        if states[url] == state:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} is still {states[url]!r}, not {state!r}")
        time.sleep(0.02)  # the poll's pace, not a synchronisation


def screenshot(url: str, output: Path, profile: Path, chromium: str = CHROMIUM) -> None:
    """Headless Chromium's picture of ``url``, after 3 s of the page's (virtual) time."""
    width, height = WINDOW_SIZE
    arguments = ["--hide-scrollbars", "--virtual-time-budget=3000"]
    arguments += [f"--window-size={width},{height}", f"--screenshot={output}", url]
    run_chromium(arguments, profile, chromium)
    if not output.is_file() or output.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot to {output}")


def render(output: Path, chromium: str = CHROMIUM, profile: Path | None = None) -> Path:
    """Run the demo and write the screenshot of its status page to ``output``."""
    output = Path(output).resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        if profile is None:
            profile = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        names = ["backend-1", "backend-2", "backend-3"]
        backends = [stack.enter_context(running(backend(name))) for name in names]
        pool = Pool(
            [
                Upstream(backends[0].url),
                Upstream(backends[1].url, weight=3),
                Upstream(backends[2].url),
            ],
            health_check=HealthCheck(path="/health", interval=0.1, rise=1, fall=1),
        )
        middleware = RoundRobinMiddleware(Starlette(), pools={"/api": pool}, status_path="/status")
        proxy = stack.enter_context(running(middleware, lifespan="on"))
        http = stack.enter_context(httpx.Client(base_url=proxy.url, trust_env=False, timeout=10))
        for n in range(40):
            http.get(f"/api/orders/{n}", params={"fail": 1} if n == 17 else None)
        backends[2].stop()
        wait_for_state(http, backends[2].url, "down")
        for n in range(8):
            http.get(f"/api/orders/{40 + n}")
        screenshot(proxy.url + "/status", output, profile, chromium)
    return output


def main() -> int:
    default = Path(__file__).with_name("status-page.png")
    output = render(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
    print(f"wrote {output} ({output.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
