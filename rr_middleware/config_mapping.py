"""TOML values onto the configuration classes, through declared key tables.

Each configurable class has a :class:`KeyTable` (the gateway's are in ``gateway_config``):
every TOML key it takes, with the converter that checks the value's TOML type and turns it
into what the Python API takes, and the init fields that take Python objects and so have
no key. ``NUMBER`` takes ``30`` or ``30.0`` as a float; ``optional(NUMBER)`` also takes
``false`` for ``None`` (TOML has no null); ``Array(INTEGER, frozenset)``,
``Table(HEALTH_CHECK)`` and ``Tagged({"consul": ..., "dns": ...})`` nest. Nothing is
inferred from annotations or names, so what a file may say is exactly what the tables say,
whatever a module imports only for type checking; a test holds every table to its class's
init fields, so an option cannot be added to a class and forgotten here.

Validation stays in the classes, one rule in one place for both front ends: their
:class:`~rr_middleware.config.FieldError` names the field, and the mapping puts its
``problem`` after the key path (``pools."/api".upstreams[1].weight: must be an integer >=
0, got -1``). Every mistake is a :class:`ConfigError`.

Why no library: pydantic, msgspec and cattrs all read the classes' type hints (the
evaluation of annotations this module exists to avoid, with ``httpx`` and ``ASGIApp``
imported only for type checking) or want a second model class per configuration class;
their error locations and wording would need translating into key paths anyway, and
pydantic and msgspec are compiled dependencies for the sake of one small file. The
converters here are a page, and the messages are ours.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from .errors import FieldError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the backport, declared by the "gateway" extra
    import tomli as tomllib

__all__ = [
    "BOOLEAN",
    "INTEGER",
    "NUMBER",
    "STRING",
    "AnyOf",
    "Array",
    "ConfigError",
    "Converter",
    "Interpolated",
    "KeyTable",
    "MapOf",
    "Regex",
    "Table",
    "Tagged",
    "key_path",
    "optional",
    "reject_unknown",
    "table_of",
]

T = TypeVar("T")
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
    """The value at ``key`` has the wrong TOML type (``AnyOf`` tries its next choice)."""


class Converter(Generic[T]):
    """Checks one TOML value and turns it into what the Python API takes."""

    #: What the value should be, for "expected <expected>, got ...".
    expected: str

    def __call__(self, value: object, where: str) -> T:
        raise NotImplementedError

    def mismatch(self, value: object, where: str) -> _Mismatch:
        return _Mismatch(where, f"expected {self.expected}, got {_describe_value(value)}")

    def tables(self) -> Iterator[KeyTable[Any]]:
        """The key tables of the tables this converter builds, however deep."""
        return iter(())


class Interpolated(str):
    """A string value that held a ``${...}`` reference (``environment.py``): the converters
    of numbers and booleans read the TOML value its text spells (``"8080"``), which they
    refuse from a string written in the file."""

    __slots__ = ()


class _Scalar(Converter[T]):
    def __init__(self, expected: str, fits: Callable[[object], bool], make: Callable[[Any], T]):
        self.expected = expected
        self._fits = fits
        self._make = make

    def __call__(self, value: object, where: str) -> T:
        if isinstance(value, Interpolated) and not self._fits(value):
            value = _toml_scalar(value)
        if not self._fits(value):
            raise self.mismatch(value, where)
        return self._make(value)


def _toml_scalar(text: str) -> object:
    """The TOML integer, float or boolean ``text`` spells, else ``text`` itself."""
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except (tomllib.TOMLDecodeError, KeyError):
        return text
    return value if isinstance(value, (bool, int, float)) else text


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


BOOLEAN = _Scalar("true or false", lambda v: isinstance(v, bool), bool)
INTEGER = _Scalar("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), int)
NUMBER = _Scalar("a number", _is_number, float)  # seconds: 30 and 30.0 alike
STRING = _Scalar("a string", lambda v: isinstance(v, str), str)


class _Optional(Converter[T | None]):
    def __init__(self, inner: Converter[T]) -> None:
        self.inner = inner
        self.expected = f"{inner.expected} (or false: unset)"

    def __call__(self, value: object, where: str) -> T | None:
        if value is False or (isinstance(value, Interpolated) and value.strip() == "false"):
            return None
        return self.inner(value, where)

    def tables(self) -> Iterator[KeyTable[Any]]:
        return self.inner.tables()


def optional(inner: Converter[T]) -> Converter[T | None]:
    """``inner``, or ``false`` for ``None``: TOML has no null."""
    return _Optional(inner)


class Array(Converter[Any]):
    """A TOML array, each item converted (errors name ``key[i]``), collected by ``into``."""

    def __init__(self, item: Converter[Any], into: Callable[[list[Any]], Any] = list) -> None:
        self.item = item
        self.into = into
        self.expected = f"an array (each {item.expected})"

    def __call__(self, value: object, where: str) -> Any:
        if not isinstance(value, list):
            raise self.mismatch(value, where)
        return self.into([_settled(self.item, v, f"{where}[{i}]") for i, v in enumerate(value)])

    def tables(self) -> Iterator[KeyTable[Any]]:
        return self.item.tables()


class MapOf(Converter[dict[str, Any]]):
    """A TOML table of any keys, each value converted (``{ stable = 95, canary = 5 }``)."""

    def __init__(self, value: Converter[Any]) -> None:
        self.value = value
        self.expected = f"a table (each value {value.expected})"

    def __call__(self, value: object, where: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.mismatch(value, where)
        return {k: _settled(self.value, v, key_path(where, k)) for k, v in value.items()}


class Regex(Converter["re.Pattern[str]"]):
    """``{ regex = "..." }``: a compiled regular expression."""

    expected = '{ regex = "..." }'

    def __call__(self, value: object, where: str) -> re.Pattern[str]:
        if not isinstance(value, dict) or set(value) != {"regex"}:
            raise self.mismatch(value, where)
        pattern = value["regex"]
        if not isinstance(pattern, str):
            raise ConfigError(key_path(where, "regex"), "expected a string")
        try:
            return re.compile(pattern)
        except re.error as exc:
            raise ConfigError(key_path(where, "regex"), f"not a valid regex: {exc}") from None


class AnyOf(Converter[Any]):
    """The first alternative whose TOML type fits (``"10.0.0.0/8"`` or an array of them)."""

    def __init__(self, *alternatives: Converter[Any]) -> None:
        self.alternatives = alternatives
        self.expected = " or ".join(a.expected for a in alternatives)

    def __call__(self, value: object, where: str) -> Any:
        for alternative in self.alternatives:
            try:
                return alternative(value, where)
            except _Mismatch:  # a mistake inside a part is a ConfigError, not this
                continue
        raise self.mismatch(value, where)

    def tables(self) -> Iterator[KeyTable[Any]]:
        for alternative in self.alternatives:
            yield from alternative.tables()


class KeyTable(Generic[T]):
    """The TOML keys of one configurable class.

    ``keys`` maps each key to its converter; ``python_only`` names the init fields that
    take Python objects (a transport, a clock), which a file cannot set. With
    ``shorthand``, a bare string stands for a table holding just that key
    (``"http://a:8000"`` for ``{ url = "http://a:8000" }``).
    """

    def __init__(
        self,
        target: Callable[..., T],
        keys: Mapping[str, Converter[Any]],
        *,
        python_only: Iterable[str] = (),
        shorthand: str | None = None,
    ) -> None:
        self.target = target
        self.keys = dict(keys)
        self.python_only = frozenset(python_only)
        self.shorthand = shorthand
        parameters = inspect.signature(target).parameters
        self.required = [k for k in self.keys if parameters[k].default is inspect.Parameter.empty]

    def arguments(self, table: object, where: str) -> dict[str, Any]:
        """The keyword arguments ``table`` stands for, each converted; ConfigError
        naming the key of the first mistake."""
        if isinstance(table, str) and self.shorthand is not None:
            table = {self.shorthand: table}
        if not isinstance(table, dict):
            raise _Mismatch(where, f"expected a table, got {_describe_value(table)}")
        reject_unknown(table, self.keys, where, self.python_only)
        missing = [key for key in self.required if key not in table]
        if missing:
            raise ConfigError(where, f"missing required key {missing[0]!r}")
        return {key: _settled(self.keys[key], v, key_path(where, key)) for key, v in table.items()}

    def create(
        self, arguments: dict[str, Any], where: str, *positional: Any, elsewhere: str = ""
    ) -> T:
        """``target(*positional, **arguments)``. Its FieldError about one of the keys
        becomes a ConfigError at that key; any other ValueError one at ``elsewhere`` (by
        default the table itself)."""
        try:
            return self.target(*positional, **arguments)
        except FieldError as exc:
            if exc.field in self.keys:
                raise ConfigError(key_path(where, exc.field), exc.problem) from None
            raise ConfigError(elsewhere or where, str(exc)) from None
        except ValueError as exc:
            raise ConfigError(elsewhere or where, str(exc)) from None

    def build(self, table: object, where: str) -> T:
        return self.create(self.arguments(table, where), where)

    def tables(self) -> Iterator[KeyTable[Any]]:
        """The key tables of the tables nested in this one, however deep."""
        for convert in self.keys.values():
            yield from convert.tables()


class Table(Converter[T]):
    """A TOML table (or its shorthand string) built by a :class:`KeyTable`."""

    def __init__(self, keys: KeyTable[T]) -> None:
        self.table = keys
        self.expected = f"a {keys.shorthand} string or a table" if keys.shorthand else "a table"

    def __call__(self, value: object, where: str) -> T:
        return self.table.build(value, where)

    def tables(self) -> Iterator[KeyTable[Any]]:
        yield self.table
        yield from self.table.tables()


class Tagged(Converter[Any]):
    """A table whose ``type`` key picks the class: ``{type = "consul", service = ...}``."""

    def __init__(self, choices: Mapping[str, KeyTable[Any]], tag: str = "type") -> None:
        self.choices = dict(choices)
        self.tag = tag
        self.expected = "a table"

    def __call__(self, value: object, where: str) -> Any:
        table = table_of(value, where)
        kind = table.get(self.tag)
        if not isinstance(kind, str):
            raise ConfigError(key_path(where, self.tag), self._choice(f"a {self.tag} is required"))
        if kind.lower() not in self.choices:
            raise ConfigError(
                key_path(where, self.tag), self._choice(f"unknown {self.tag} {kind!r}")
            )
        rest = {k: v for k, v in table.items() if k != self.tag}
        return self.choices[kind.lower()].build(rest, where)

    def tables(self) -> Iterator[KeyTable[Any]]:
        for choice in self.choices.values():
            yield choice
            yield from choice.tables()

    def name_of(self, value: object) -> str:
        """The ``type`` that builds ``value``'s class."""
        return next(name for name, keys in self.choices.items() if type(value) is keys.target)

    def _choice(self, message: str) -> str:
        return f"{message} (known: {', '.join(repr(k) for k in sorted(self.choices))})"


def key_path(where: str, key: str) -> str:
    """``pools`` + ``/api`` → ``pools."/api"``: keys written as TOML would write them."""
    part = key if _BARE_KEY.fullmatch(key) else '"' + key.replace('"', '\\"') + '"'
    return f"{where}.{part}" if where else part


def table_of(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(where, f"expected a table, got {_describe_value(value)}")
    return value


def reject_unknown(
    table: Mapping[str, Any], known: Iterable[str], where: str, python_only: Iterable[str] = ()
) -> None:
    known = list(known)
    for key in table:
        if key in python_only:
            raise ConfigError(
                key_path(where, key), "takes a Python object: set it with the Python API"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                key_path(where, key), f"unknown key{hint}; known keys: {', '.join(known)}"
            )


def _settled(convert: Converter[Any], value: object, where: str) -> Any:
    """Convert a part of a value: once its container's type fits, a mistake inside it is
    the error to report (not a reason for an ``AnyOf`` to try another choice)."""
    try:
        return convert(value, where)
    except _Mismatch as exc:
        raise ConfigError(exc.key, exc.message) from None


def _describe_value(value: object) -> str:
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    kinds.update({list: "an array", dict: "a table"})
    return f"{kinds.get(type(value), type(value).__name__)} ({value!r})"
