"""The gateway's file, completed from the environment: ``${VAR}`` references and Consul's
own variables.

**References.** Any string value of the TOML file may hold ``${NAME}`` (the variable's
value; a start-up error naming the key if it is unset), ``${NAME:-default}`` (the default
when the variable is unset or empty, as in the shell and Compose) and ``$$`` (a literal
``$``). A ``$`` followed by anything else stays as written. References are replaced in
values only, after the TOML is parsed, so a value can never change the file's structure
(a token holding ``"`` or a newline is just a string). A string that held a reference may
stand for a number or a boolean (``port = "${PORT:-8080}"``): the key's converter reads it
as the TOML value it spells, which a plain string never is.

**Consul.** A ``[pools."/x".discovery]`` table of ``type = "consul"`` takes what it does
not say from the variables the Consul CLI and its API client read, with their precedence:
the file's key, then ``CONSUL_HTTP_TOKEN_FILE`` (the token read from that file, as the
Consul API client lets a token file win over ``CONSUL_HTTP_TOKEN``), then
``CONSUL_HTTP_TOKEN``; ``address`` from ``CONSUL_HTTP_ADDR`` (``host:port`` takes
``http://``, or ``https://`` with ``CONSUL_HTTP_SSL=true``); ``ca_file`` from
``CONSUL_CACERT``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .config_mapping import ConfigError, Interpolated, key_path

__all__ = ["CONSUL_ENV", "consul_from_environment", "interpolate"]

#: The Consul variables read, each with the discovery key it fills.
CONSUL_ENV = {
    "CONSUL_HTTP_ADDR": "address",
    "CONSUL_HTTP_TOKEN_FILE": "token",
    "CONSUL_HTTP_TOKEN": "token",
    "CONSUL_CACERT": "ca_file",
}
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
_TRUE = ("1", "t", "true", "yes", "on")


def interpolate(document: Any, environ: Mapping[str, str], where: str = "") -> Any:
    """``document`` with every ``${...}`` in its string values replaced; ConfigError
    naming the key of a variable that is unset and has no default."""
    if isinstance(document, dict):
        return {k: interpolate(v, environ, key_path(where, k)) for k, v in document.items()}
    if isinstance(document, list):
        return [interpolate(v, environ, f"{where}[{i}]") for i, v in enumerate(document)]
    if isinstance(document, str) and "$" in document:
        return _substitute(document, environ, where)
    return document


def _substitute(text: str, environ: Mapping[str, str], where: str) -> str:
    referenced = False

    def replace(match: re.Match[str]) -> str:
        nonlocal referenced
        name, default = match.group(1), match.group(2)
        if name is None:
            return "$"  # $$
        referenced = True
        value = environ.get(name)
        if value:
            return value
        if default is not None:
            return default
        if value is None:
            raise ConfigError(
                where,
                f"${{{name}}}: the environment variable {name} is not set "
                f"(set it, or give a default: ${{{name}:-value}})",
            )
        return value

    result = _REFERENCE.sub(replace, text)
    return Interpolated(result) if referenced else result


def consul_from_environment(
    table: dict[str, Any], environ: Mapping[str, str], where: str
) -> dict[str, Any]:
    """A consul discovery table completed from Consul's variables (the file's keys win)."""
    table = dict(table)
    address = environ.get("CONSUL_HTTP_ADDR", "").strip()
    if "address" not in table and address:
        if "://" not in address:
            ssl = environ.get("CONSUL_HTTP_SSL", "").strip().lower() in _TRUE
            address = f"{'https' if ssl else 'http'}://{address}"
        table["address"] = address
    if "token" not in table:
        token = _token_from_file(environ.get("CONSUL_HTTP_TOKEN_FILE", ""), where)
        token = token or environ.get("CONSUL_HTTP_TOKEN", "").strip()
        if token:
            table["token"] = token
    ca_file = environ.get("CONSUL_CACERT", "").strip()
    if "ca_file" not in table and ca_file:
        table["ca_file"] = ca_file
    return table


def _token_from_file(path: str, where: str) -> str:
    if not path.strip():
        return ""
    try:
        with open(path.strip(), encoding="utf-8") as file:
            return file.read().strip()
    except OSError as exc:
        raise ConfigError(
            key_path(where, "token"),
            f"CONSUL_HTTP_TOKEN_FILE={path!r} cannot be read: {exc.strerror or exc}",
        ) from None
