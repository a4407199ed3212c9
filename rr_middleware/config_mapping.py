"""TOML values onto the configuration dataclasses, generically.

``build_dataclass(Pool, table, 'pools."/api"')`` reads the dataclass's fields and their
type hints and converts every value to its field's type (bool, int, float, str, unions,
arrays as lists or frozensets, nested dataclasses), so an option added to ``Pool``,
``HealthCheck`` or ``Upstream`` is a TOML key at once. Every mistake is a
:class:`ConfigError` naming the key path (``pools."/api".upstreams[1].weight``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
from collections.abc import Callable, Collection, Container, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Union, get_args, get_origin

__all__ = [
    "ConfigError",
    "build_dataclass",
    "convert",
    "field_hints",
    "key_named_in",
    "key_path",
    "reject_unknown",
    "resolve_hint",
    "supported",
    "table_of",
]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class ConfigError(Exception):
    """A configuration mistake: ``str()`` is ``"file: key.path: what is wrong"``."""

    def __init__(self, key: str, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.message = message
        self.file = file

    def __str__(self) -> str:
        return ": ".join(part for part in (self.file, self.key, self.message) if part)


class _Mismatch(ConfigError):
    """The value has the wrong TOML type (a union tries its next alternative)."""


def build_dataclass(cls: type[Any], table: Any, where: str) -> Any:
    """``cls(**table)`` with every value converted to its field's type hint; errors name
    the key. A string stands for a table holding just the first field when that field
    is the only required one (``"http://..."`` for ``Upstream(url)``)."""
    hints = field_hints(cls)
    shorthand = _shorthand_field(cls)
    if isinstance(table, str) and shorthand is not None:
        table = {shorthand: table}
    if not isinstance(table, dict):
        raise _Mismatch(where, f"expected a table, got {_describe_value(table)}")
    kwargs: dict[str, Any] = {}
    for key, build in _TAGGED_FIELDS.items():  # first: they say what this version lacks
        if key in table:
            kwargs[key] = build(table[key], key_path(where, key))
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    reject_unknown(table, hints, where, fields)
    for key, value in table.items():
        if key not in kwargs:
            kwargs[key] = _settled(convert, value, hints[key], key_path(where, key))
    optional = {"upstreams"} if "discovery" in table else set()  # the Pool decides
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.init and _is_required(f) and f.name not in kwargs and f.name not in optional
    ]
    if missing:
        raise ConfigError(where, f"missing required key {missing[0]!r}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        named = key_named_in(str(exc), table)
        where = key_path(where, named) if named else where
        raise ConfigError(where, str(exc).removeprefix(f"{named}: ")) from None


def convert(value: Any, hint: Any, where: str) -> Any:
    """Convert a TOML value to ``hint`` (bool, int, float, str, unions, collections of
    those, dataclasses), or raise ConfigError."""
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        alternatives = [a for a in get_args(hint) if a is not type(None) and supported(a)]
        if value is False and type(None) in get_args(hint) and bool not in alternatives:
            return None  # TOML has no null: `false` turns an optional setting off
        for alternative in alternatives:
            try:
                return convert(value, alternative, where)
            except _Mismatch:
                continue
        raise _Mismatch(where, f"expected {_describe_hint(hint)}, got {_describe_value(value)}")
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, where)  # type: ignore[arg-type]
    if origin in _COLLECTIONS:
        if not isinstance(value, list):
            raise _Mismatch(where, f"expected {_describe_hint(hint)}, got {_describe_value(value)}")
        item_hint = get_args(hint)[0] if get_args(hint) else Any
        items = [_settled(convert, v, item_hint, f"{where}[{i}]") for i, v in enumerate(value)]
        return _COLLECTIONS[origin](items)
    if hint is Any or (hint in (int, float, str, bool) and _scalar_fits(value, hint)):
        return float(value) if hint is float else value
    raise _Mismatch(where, f"expected {_describe_hint(hint)}, got {_describe_value(value)}")


def field_hints(cls: type[Any]) -> dict[str, Any]:
    """The init fields of a dataclass that TOML can set, with their resolved type hints."""
    module = vars(sys.modules[cls.__module__])
    hints = {}
    for field in dataclasses.fields(cls):
        if field.init and not field.name.startswith("_"):
            hint = resolve_hint(field.type, module)
            if field.name in _TAGGED_FIELDS or supported(hint):
                hints[field.name] = hint
    return hints


def key_path(where: str, key: str) -> str:
    """``pools`` + ``/api`` → ``pools."/api"``: keys written as TOML would write them."""
    part = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{where}.{part}" if where else part


def _build_discovery(value: Any, where: str) -> Any:
    """``{type = "consul", ...}``: the class ``rr_middleware.<Type>Discovery``, its
    other keys mapped like any dataclass."""
    import rr_middleware

    table = table_of(value, where)
    kinds = {
        name.removesuffix("Discovery").lower(): getattr(rr_middleware, name)
        for name in dir(rr_middleware)
        if name.endswith("Discovery") and dataclasses.is_dataclass(getattr(rr_middleware, name))
    }
    kind = table.get("type")
    if not isinstance(kind, str):
        raise ConfigError(key_path(where, "type"), _choice("a discovery type is required", kinds))
    if kind.lower() not in kinds:
        raise ConfigError(key_path(where, "type"), _choice(f"unknown type {kind!r}", kinds))
    rest = {k: v for k, v in table.items() if k != "type"}
    return build_dataclass(kinds[kind.lower()], rest, where)


# Fields whose table names its class with a "type" key.
_TAGGED_FIELDS: dict[str, Callable[[Any, str], Any]] = {"discovery": _build_discovery}
_COLLECTIONS: dict[Any, Callable[[list[Any]], Any]] = {
    list: list,
    Sequence: list,
    tuple: tuple,
    set: frozenset,
    frozenset: frozenset,
    AbstractSet: frozenset,
    Collection: frozenset,
    Container: frozenset,
    Iterable: list,
}


def _settled(conversion: Callable[[Any, Any, str], Any], value: Any, hint: Any, where: str) -> Any:
    """Convert a part of a value: once its container's type fits, a mistake inside it is
    the error to report (not a reason for a union to try another type)."""
    try:
        return conversion(value, hint, where)
    except _Mismatch as exc:
        raise ConfigError(exc.key, exc.message) from None


def _choice(message: str, kinds: Mapping[str, Any]) -> str:
    known = ", ".join(repr(k) for k in sorted(kinds)) or "none in this version"
    return f"{message} (known: {known})"


def resolve_hint(annotation: Any, module: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, module)  # annotations are postponed strings here
    except Exception:  # names only imported for type checking: not settable from TOML
        return None


def supported(hint: Any) -> bool:
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return any(a is not type(None) and supported(a) for a in get_args(hint))
    if origin in _COLLECTIONS:
        args = get_args(hint)
        return not args or supported(args[0])
    return hint in (bool, int, float, str) or dataclasses.is_dataclass(hint)


def _scalar_fits(value: Any, hint: type) -> bool:
    if hint is bool or isinstance(value, bool):
        return hint is bool and isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe_hint(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Union or origin is types.UnionType:
        alternatives = [a for a in get_args(hint) if a is not type(None) and supported(a)]
        if str in alternatives and any(_shorthand_field(a) for a in alternatives):
            alternatives.remove(str)  # "a URL string" said it already
        return " or ".join(_describe_hint(a) for a in alternatives)
    if origin in _COLLECTIONS:
        args = get_args(hint)
        return f"an array (each {_describe_hint(args[0])})" if args else "an array"
    if dataclasses.is_dataclass(hint):
        shorthand = _shorthand_field(hint)
        return f"a table or a {shorthand} string" if shorthand else "a table"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, str(hint))


def _describe_value(value: Any) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"


def _shorthand_field(cls: Any) -> str | None:
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
        return None
    required = [f for f in dataclasses.fields(cls) if f.init and _is_required(f)]
    if len(required) == 1 and field_hints(cls).get(required[0].name) is str:
        return required[0].name
    return None


def _is_required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def table_of(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a table, got {_describe_value(value)}")
    return value


def reject_unknown(
    table: Mapping[str, Any], known: Iterable[str], where: str, python_only: Iterable[str] = ()
) -> None:
    known = list(known)
    for key in table:
        if key in python_only and key not in known:
            raise ConfigError(
                key_path(where, key), "takes a Python object: set it with the Python API"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                key_path(where, key), f"unknown key{hint}; known keys: {', '.join(known)}"
            )


def key_named_in(message: str, table: Mapping[str, Any]) -> str | None:
    """The one key of ``table`` a validation message talks about, if exactly one."""
    named = [k for k in table if re.search(rf"\b{re.escape(k)}\b", message, re.IGNORECASE)]
    return named[0] if len(named) == 1 else None
