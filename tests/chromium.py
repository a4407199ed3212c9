"""Headless Chromium, for the status page: the one runner the page tests (through the
``chromium`` fixture) and ``docs/make_screenshot.py`` share.

No pytest here: the screenshot script imports this module outside the tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
)


def chromium_installed(chromium: str = CHROMIUM) -> bool:
    return os.path.exists(chromium) and os.access(chromium, os.X_OK)


def run_chromium(arguments: list[str], profile: Path, chromium: str = CHROMIUM) -> str:
    """Run headless Chromium (a fresh profile, the flags above) with ``arguments`` and
    return its standard output; RuntimeError if it fails or takes over 60 s."""
    command = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments]
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: Chromium's helpers too
            process.communicate()
            raise RuntimeError("Chromium did not finish within 60 s") from None
    if process.returncode != 0:
        raise RuntimeError(f"Chromium failed ({process.returncode}): {stderr[-2000:]}")
    return stdout


def dump_dom(url: str, profile: Path, chromium: str = CHROMIUM) -> str:
    """Headless Chromium's DOM of ``url`` after 3 s of (virtual) page time: the page's
    script has fetched the JSON and rebuilt the table (twice: it refreshes every 2 s)."""
    return run_chromium(["--virtual-time-budget=3000", "--dump-dom", url], profile, chromium)
