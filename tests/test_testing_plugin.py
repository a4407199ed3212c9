"""The kit's pytest plugin: its fixtures, and that it is opt-in and loads from a fresh
virtualenv holding only the package, its dependencies and pytest."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rr_middleware import HealthCheck, Pool
from rr_middleware.testing import ManualClock, RrTestClient, wait_until
from rr_middleware.testing.plugin import FakeUpstreams, RrApp

ROOT = Path(__file__).resolve().parent.parent
PIP = [sys.executable, "-m", "pip"]
OFFLINE = ["--quiet", "--no-input", "--no-index", "--no-deps"]


def test_fake_upstreams_names_them_in_order(fake_upstreams: FakeUpstreams) -> None:
    a, b = fake_upstreams(2)
    (c,) = fake_upstreams(1)
    assert [f.name for f in (a, b, c)] == ["a", "b", "c"]
    assert a.url == "http://a.test"


def test_fake_upstreams_on_sockets_stop_with_the_test(fake_upstreams: FakeUpstreams) -> None:
    a, b = fake_upstreams(2, serve=True)
    assert a.url.startswith("http://127.0.0.1:")
    assert a.url != b.url


def test_rr_app_runs_the_lifespan_and_reaches_the_pools(
    fake_upstreams: FakeUpstreams, rr_clock: ManualClock, rr_app: RrApp
) -> None:
    a, b = fake_upstreams(2)
    checks = HealthCheck(interval=3600, rise=1, fall=1)
    pool = Pool([a.upstream(), b.upstream()], clock=rr_clock, health_check=checks)
    client = rr_app({"/api": pool})
    assert isinstance(client, RrTestClient)
    wait_until(lambda: a.probe_count == b.probe_count == 1)  # the lifespan's first round
    assert [client.get("/api/x").json()["upstream"] for _ in range(2)] == ["a", "b"]
    assert isinstance(rr_clock(), float)


def _distribution_files(names: list[str], into: Path) -> None:
    """Link every file of the installed distributions ``names`` and their requirements
    (for this Python) into ``into``: the dependencies a fresh install would have."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.split(r"[ ;<>=!~\[]", todo.pop())[0].lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        dist = importlib.metadata.distribution(name)
        for requirement in dist.requires or []:
            marker = requirement.partition(";")[2]
            if "extra" in marker:
                continue
            if marker and not _marker_holds(marker):
                continue
            todo.append(requirement)
        top = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for entry in top:
            source = Path(str(dist.locate_file(entry)))
            target = into / entry
            if source.exists() and not target.exists() and entry != "__pycache__":
                target.symlink_to(source)


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


@pytest.mark.slow
def test_the_plugin_loads_from_a_fresh_virtualenv(tmp_path: Path) -> None:
    pytest.importorskip("hatchling", reason="the test extra installs hatchling to build the wheel")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            *PIP,
            "wheel",
            *OFFLINE,
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("rr_middleware-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    subprocess.run(
        [*PIP, "install", *OFFLINE, "--target", str(site), str(wheel)],
        check=True,
        timeout=300,
    )
    deps = tmp_path / "deps"
    deps.mkdir()
    requirements = [r for r in importlib.metadata.requires("rr-middleware") or [] if ";" not in r]
    _distribution_files([*requirements, "pytest"], deps)
    (site / "deps.pth").write_text(str(deps) + "\n")

    project = tmp_path / "project"
    project.mkdir()
    (project / "test_kit.py").write_text(
        textwrap.dedent(
            """
            from rr_middleware import Pool

            def test_fixtures(fake_upstreams, rr_clock, rr_app):
                a, b = fake_upstreams(2)
                client = rr_app({"/api": Pool([a.upstream(), b.upstream()], clock=rr_clock)})
                assert [client.get("/api/x").json()["upstream"] for _ in "ab"] == ["a", "b"]
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}

    def pytest_in_venv() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore"],
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    unasked = pytest_in_venv()  # opt-in: without the ini option, no fixture
    assert unasked.returncode == 1, unasked.stdout + unasked.stderr
    assert "fixture 'fake_upstreams' not found" in unasked.stdout
    assert (site / "rr_middleware" / "testing" / "plugin.py").exists()  # in the wheel
    assert (site / "rr_middleware" / "py.typed").exists()

    (project / "pytest.ini").write_text("[pytest]\nrr_middleware_fixtures = true\n")
    asked = pytest_in_venv()
    assert asked.returncode == 0, asked.stdout + asked.stderr
    assert "1 passed" in asked.stdout
    imported = subprocess.run(
        [python, "-c", "import rr_middleware, fastapi"], env=env, capture_output=True, timeout=60
    )
    assert imported.returncode != 0  # nothing beyond the package's own dependencies
