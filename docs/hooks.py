"""MkDocs hooks: every default the docs state is read from the code, at build time.

A page never writes a default by hand; it names the option and this hook puts the value
in, so a changed default cannot leave the docs behind, and a new option cannot be left
out of the reference (the build fails). In ``docs/*.md``:

``{{ Pool.timeout }}``
    the default of one option, as code: `` `60.0` ``. The class is one of ``CLASSES``; the
    value comes from its signature (``inspect.signature``: dataclass fields and
    ``__init__`` keywords alike).

``{{ signature: Pool }}``
    a ``python`` block with the class and every parameter with its default.

``{{ options: Pool }}`` followed by a table ``| Option | Meaning |``
    that table with two columns added from the code: ``Default``, and ``TOML`` (the key's
    type in the gateway's file, from the key tables in ``rr_middleware/gateway_config.py``,
    or "Python only"). Its rows must be exactly the class's options, or the build fails.
    The meanings stay hand-written.

``{{ errors }}``
    the exception tree of ``rr_middleware/errors.py`` as a table: each class's ``kind``,
    the client's status, whether it may be retried and whether it counts against the
    upstream, from the classes' own attributes.

``{{ failure kinds }}``
    the ``kind`` of every upstream failure held against the upstream (the label of
    ``rr_upstream_failures_total``) that an exception class names.

Relative links that leave ``docs/`` (``../examples/compose/``) become links into the
repository on GitHub, after a check that the file exists.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

from rr_middleware import (
    TLS,
    Balancer,
    ConsulDiscovery,
    DNSDiscovery,
    HealthCheck,
    Http1Transport,
    HttpxTransport,
    Pool,
    RoundRobinMiddleware,
    Route,
    StickyCookie,
    Upstream,
    errors,
)
from rr_middleware.config_mapping import AnyOf, Array, Converter, KeyTable, Table, Tagged
from rr_middleware.gateway_config import (
    CONSUL,
    DNS,
    GATEWAY_MIDDLEWARE_DEFAULTS,
    HEALTH_CHECK,
    MIDDLEWARE,
    POOL,
    ROUTE,
    SERVER,
    STICKY,
    TLS_KEYS,
    UPSTREAM,
    ServerSettings,
)
from rr_middleware.transport.aiohttp_transport import AiohttpTransport

#: The classes a page may name, each with its gateway key table (None: no TOML form).
CLASSES: dict[str, tuple[Any, KeyTable[Any] | None]] = {
    "RoundRobinMiddleware": (RoundRobinMiddleware, MIDDLEWARE),
    "Balancer": (Balancer, None),
    "Pool": (Pool, POOL),
    "Upstream": (Upstream, UPSTREAM),
    "HealthCheck": (HealthCheck, HEALTH_CHECK),
    "TLS": (TLS, TLS_KEYS),
    "StickyCookie": (StickyCookie, STICKY),
    "Route": (Route, ROUTE),
    "ConsulDiscovery": (ConsulDiscovery, CONSUL),
    "DNSDiscovery": (DNSDiscovery, DNS),
    "ServerSettings": (ServerSettings, SERVER),
    "Http1Transport": (Http1Transport, None),
    "HttpxTransport": (HttpxTransport, None),
    "AiohttpTransport": (AiohttpTransport, None),
}
# Parameters that are not options: the app the middleware wraps.
_NOT_OPTIONS = {"RoundRobinMiddleware": {"app"}}
# Options the gateway's file gives by its structure, not as a key.
_TOML_ELSEWHERE = {
    ("RoundRobinMiddleware", "pools"): 'a `[pools."/prefix"]` table each',
    ("RoundRobinMiddleware", "routes"): "a `[[routes]]` table each",
}
# Integer options counted in bytes, shown in KiB too.
_BYTES = re.compile(r"size|limit|bytes|length")
REPOSITORY = "https://github.com/rr-middleware/rr-middleware"

_DEFAULT = re.compile(r"\{\{\s*([A-Za-z0-9]+)\.([a-z_]+)\s*\}\}")
_SIGNATURE = re.compile(r"^\{\{\s*signature:\s*([A-Za-z0-9]+)\s*\}\}$", re.MULTILINE)
_OPTIONS = re.compile(r"^\{\{\s*options:\s*([A-Za-z0-9]+)\s*\}\}\n((?:\|.*\n?)+)", re.MULTILINE)
_ERRORS = re.compile(r"^\{\{\s*errors\s*\}\}$", re.MULTILINE)
_KINDS = re.compile(r"\{\{\s*failure kinds\s*\}\}")
_LEFT_OVER = re.compile(r"\{\{\s*[A-Za-z][^}]*\}\}")
_LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    where = page.file.src_uri
    markdown = _OPTIONS.sub(lambda m: _options_table(m[1], m[2], where), markdown)
    markdown = _SIGNATURE.sub(lambda m: _signature(m[1], where), markdown)
    markdown = _ERRORS.sub(lambda m: _errors_table(), markdown)
    markdown = _KINDS.sub(lambda m: _failure_kinds(), markdown)
    markdown = _DEFAULT.sub(lambda m: _default_text(m[1], m[2], where), markdown)
    left = _LEFT_OVER.search(markdown)
    if left is not None:
        raise PluginError(f"{where}: unknown placeholder {left[0]}")
    source = Path(page.file.abs_src_path)
    docs = Path(config["docs_dir"])
    return _LINK.sub(lambda m: _repository_link(m, source, docs, where), markdown)


# -- defaults ------------------------------------------------------------------------------


def _parameters(name: str, where: str) -> dict[str, inspect.Parameter]:
    if name not in CLASSES:
        raise PluginError(
            f"{where}: no class {name!r} to read defaults from ({', '.join(CLASSES)})"
        )
    target = CLASSES[name][0]
    parameters = inspect.signature(target).parameters
    skip = _NOT_OPTIONS.get(name, set())
    return {n: p for n, p in parameters.items() if n not in skip}


def _default(name: str, option: str, where: str) -> Any:
    parameters = _parameters(name, where)
    if option not in parameters:
        raise PluginError(f"{where}: {name} has no option {option!r}")
    return parameters[option].default


def _default_text(name: str, option: str, where: str) -> str:
    default = _default(name, option, where)
    if default is inspect.Parameter.empty:
        raise PluginError(f"{where}: {name}.{option} has no default (it is required)")
    return _render(default, option)


def _python(value: Any) -> str:
    """A default as Python source."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, frozenset):
        if not value:
            return "frozenset()"
        return "{" + ", ".join(_python(v) for v in sorted(value)) + "}"
    if isinstance(value, tuple):
        items = ", ".join(_python(v) for v in value)
        return f"({items},)" if len(value) == 1 else f"({items})"
    if inspect.isroutine(value):
        return f"{value.__module__}.{value.__qualname__}"
    return repr(value)


def _render(value: Any, option: str) -> str:
    text = f"`{_python(value)}`"
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and _BYTES.search(option)
        and value >= 1024
        and value % 1024 == 0
    ):
        text += f" ({value // 1024} KiB)"
    return text


def _signature(name: str, where: str) -> str:
    parameters = inspect.signature(CLASSES[name][0]).parameters if name in CLASSES else None
    if parameters is None:
        raise PluginError(f"{where}: no class {name!r} for a signature")
    parts: list[str] = []
    keyword_only = False
    for parameter in parameters.values():
        if parameter.name == "self":
            continue
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only:
            parts.append("*")
            keyword_only = True
        if parameter.default is inspect.Parameter.empty:
            parts.append(parameter.name)
        else:
            parts.append(f"{parameter.name}={_python(parameter.default)}")
    lines = [f"{name}("] + [f"    {part}," for part in parts] + [")"]
    return "```python\n" + "\n".join(lines) + "\n```"


# -- option tables -------------------------------------------------------------------------


def _options_table(name: str, table: str, where: str) -> str:
    parameters = _parameters(name, where)
    keys = CLASSES[name][1]
    rows = [line for line in table.strip().splitlines()]
    if len(rows) < 3:
        raise PluginError(f"{where}: the options table of {name} has no rows")
    documented: dict[str, str] = {}
    for row in rows[2:]:
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) != 2 or not re.fullmatch(r"`[a-z_]+`", cells[0]):
            raise PluginError(f"{where}: {name} table row {row!r}: want | `option` | meaning |")
        option = cells[0].strip("`")
        if option in documented:
            raise PluginError(f"{where}: {name} option {option!r} twice")
        documented[option] = cells[1]
    missing = [option for option in parameters if option not in documented]
    unknown = [option for option in documented if option not in parameters]
    if missing or unknown:
        raise PluginError(
            f"{where}: the {name} table does not match the code:"
            f" undocumented {missing}, not options {unknown}"
        )
    if keys is None:  # no TOML form: no TOML column
        out = ["| Option | Default | Meaning |", "| --- | --- | --- |"]
    else:
        out = ["| Option | Default | TOML | Meaning |", "| --- | --- | --- | --- |"]
    for option, parameter in parameters.items():
        default = parameter.default
        cells = ["required" if default is inspect.Parameter.empty else _render(default, option)]
        if keys is not None:
            cells.append(_toml_column(name, option, default, keys))
        out.append(f"| `{option}` | {' | '.join(cells)} | {documented[option]} |")
    return "\n".join(out) + "\n"


def _toml_column(name: str, option: str, default: Any, keys: KeyTable[Any]) -> str:
    if (name, option) in _TOML_ELSEWHERE:
        return _TOML_ELSEWHERE[name, option]
    if option in keys.python_only or option not in keys.keys:
        return "Python only"
    text = _toml_type(keys.keys[option])
    converter = keys.keys[option]
    if type(converter).__name__ == "_Optional" and default is not None:
        text += "; `false`: `None`"
    if name == "RoundRobinMiddleware" and option in GATEWAY_MIDDLEWARE_DEFAULTS:
        gateway = GATEWAY_MIDDLEWARE_DEFAULTS[option]
        text += f"; default in the gateway: `{_toml_value(gateway)}`"
    return text


def _toml_type(converter: Converter[Any]) -> str:
    if isinstance(converter, Array):
        return f"array of {_plural(_toml_type(converter.item))}"
    if isinstance(converter, AnyOf):
        return " or ".join(_toml_type(a) for a in converter.alternatives)
    if isinstance(converter, Tagged):
        kinds = " or ".join(f'`"{tag}"`' for tag in converter.choices)
        return f"table with `{converter.tag}` {kinds}"
    if isinstance(converter, Table):
        keys = converter.table
        if keys.shorthand is not None:
            names = ", ".join(f"`{key}`" for key in keys.keys)
            return f"`{keys.shorthand}` string, or table ({names})"
        return f"table ({getattr(keys.target, '__name__', 'see its class')})"
    inner = getattr(converter, "inner", None)
    if inner is not None:  # optional(...): TOML has no null
        return _toml_type(inner)
    scalar = {"true or false": "boolean", "an integer": "integer", "a number": "number"}
    return scalar.get(converter.expected, converter.expected.removeprefix("a "))


def _plural(kind: str) -> str:
    if " string, or table " in kind:  # a table with a shorthand: "`url` string, or table (...)"
        key, _, rest = kind.partition(" string, or table ")
        return f"{key} strings or tables {rest}"
    return {"integer": "integers", "string": "strings", "number": "numbers"}.get(kind, kind)


def _toml_value(value: Any) -> str:
    if isinstance(value, (list, tuple, frozenset)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


# -- errors --------------------------------------------------------------------------------


def _error_classes() -> list[type[BaseException]]:
    found = [getattr(errors, name) for name in errors.__all__]
    tree = [c for c in found if issubclass(c, errors.ProxyError)]
    ordered: list[type[BaseException]] = []

    def add(parent: type[BaseException]) -> None:
        ordered.append(parent)
        children = [c for c in tree if c.__bases__[0] is parent]
        for child in sorted(children, key=lambda c: inspect.getsourcelines(c)[1]):
            add(child)

    add(errors.ProxyError)
    if set(ordered) != set(tree):
        raise PluginError(
            f"errors.py: classes outside the ProxyError tree: {set(tree) - set(ordered)}"
        )
    return ordered


def _errors_table() -> str:
    out = [
        "| Exception | `kind` | Status | Nothing sent | Next upstream | Counts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for cls in _error_classes():
        depth = len([b for b in cls.__mro__ if issubclass(b, errors.ProxyError)]) - 1
        name = "&nbsp;&nbsp;&nbsp;&nbsp;" * depth + f"`{cls.__name__}`"
        status = getattr(cls, "status", 0)
        client = f"**{status}**" if status else "none"
        if issubclass(cls, errors.UpstreamError):
            kind = f"`{cls.kind}`"
            sent = "yes" if not cls.sent else "no"
            retriable = "yes" if cls.retriable else "no"
            counts = "yes" if cls.counts else "no"
        else:
            kind = sent = retriable = counts = "—"
        out.append(f"| {name} | {kind} | {client} | {sent} | {retriable} | {counts} |")
    return "\n".join(out) + "\n"


def _failure_kinds() -> str:
    kinds: list[str] = []
    for cls in _error_classes():
        if issubclass(cls, errors.UpstreamError) and cls.counts and cls.kind != "error":
            kinds.append(f"`{cls.kind}`")
    return ", ".join(kinds)


# -- links into the repository -------------------------------------------------------------


def _repository_link(match: re.Match[str], source: Path, docs: Path, where: str) -> str:
    target = Path(os.path.normpath(source.parent / match[1]))
    if target.is_relative_to(docs) and target.suffix != ".py":  # scripts are not pages
        return match[0]
    root = docs.parent
    if not target.is_relative_to(root) or not target.exists():
        raise PluginError(f"{where}: link to {match[1]}, which is not in the repository")
    kind = "tree" if target.is_dir() else "blob"
    relative = target.relative_to(root).as_posix()
    return f"]({REPOSITORY}/{kind}/main/{relative}{match[2] or ''})"
