"""What the ``pytest11`` entry point loads in every pytest run where rr-middleware is
installed: the ini option ``rr_middleware_fixtures`` and nothing else (none of the kit is
imported), unless a project sets it true, when the kit's fixtures
(``rr_middleware.testing.plugin``) are loaded."""

from __future__ import annotations

import pytest

PLUGIN = "rr_middleware.testing.plugin"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "rr_middleware_fixtures",
        type="bool",
        default=False,
        help="load rr-middleware's test fixtures (fake_upstreams, rr_clock, rr_app)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getini("rr_middleware_fixtures") and not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)
