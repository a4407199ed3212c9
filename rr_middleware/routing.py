"""Which pool a request path belongs to, and which paths are refused outright.

Kept apart from the middleware because it is the one piece every request runs, matched or
not: it works on the raw path bytes and costs O(segments of the longest prefix), whatever
the number of pools.

Matching is on path-segment boundaries (``/api`` matches ``/api`` and ``/api/x``, never
``/apix``); the longest prefix wins and ``/`` matches everything. Segments are compared
percent-decoded (``/%61pi`` is under ``/api``), but an encoded slash never splits a
segment: ``/api%2Fx`` is the single segment ``api/x``.

Under a pool, a path is refused outright when it is not safe to forward
(``is_unsafe_path``), has a dot segment (``has_dot_segment``), or, unless the pool turns
it off, when some upstream servers would read one into it (``is_ambiguous_path``). Each
is a pure function of the raw path, quick to say no on ordinary paths.

``host_matches`` is a route's ``host`` condition (``matching.py``), also used where two
routes' hosts are compared (``sticky.py``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Generic, TypeVar
from urllib.parse import unquote_to_bytes

__all__ = [
    "PrefixRouter",
    "has_dot_segment",
    "host_matches",
    "is_ambiguous_path",
    "is_plain_path",
    "is_unsafe_path",
]

T = TypeVar("T")

# Raw bytes a pooled path may not carry: controls, space, DEL, non-ASCII (a request target
# is ASCII; such bytes must be percent-encoded), "#" (a fragment is never part of a request
# target) and backslash (which some upstream servers treat as "/", reopening dot-segment
# tricks).
_UNSAFE_RAW = re.compile(rb"[\x00-\x20\x7f-\xff\\#]")
_DOT_SEGMENTS = (b".", b"..")
# Overlong UTF-8: a character in more bytes than it needs, which RFC 3629 §3 forbids and
# lenient decoders read anyway ("%c0%ae" as "."). Lead C0 or C1 (2 bytes), E0 with a second
# byte below A0 (3 bytes), F0 with a second byte below 90 (4 bytes).
# Bytes looked for as ints: "b'%' in path" goes through the buffer protocol and costs
# several times "37 in path" (a memchr).
_PERCENT = ord("%")
_SEMICOLON = ord(";")
_DOT = ord(".")
# What nearly every path is: origin-form, of unreserved characters, sub-delimiters other
# than ";", ":", "@" and "/" only (RFC 3986 §3.3), so with no byte any refusal looks at.
_PLAIN = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_OVERLONG = re.compile(
    rb"[\xc0\xc1][\x80-\xbf]|\xe0[\x80-\x9f][\x80-\xbf]|\xf0[\x80-\x8f][\x80-\xbf]{2}"
)


def host_matches(pattern: str, host: str) -> bool:
    """Whether ``host`` (lower-case, without port) matches a route's ``host`` pattern:
    the name itself, or with ``*.example.com`` any subdomain of ``example.com``."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


def is_plain_path(raw_path: bytes) -> bool:
    """True for a path none of the refusals below can apply to (one match, where they
    would take several scans): origin-form, with no "%", ";", backslash, control or
    non-ASCII byte, and no segment starting with a dot."""
    return _PLAIN.fullmatch(raw_path) is not None and b"/." not in raw_path


def has_dot_segment(raw_path: bytes) -> bool:
    """True if the path has a ``.`` or ``..`` segment, literally or percent-encoded.

    Encoded slashes and backslashes count as separators here: an upstream that decodes
    them must not be handed ``/api/..%2Fadmin`` either.
    """
    if _DOT not in raw_path and _PERCENT not in raw_path:
        return False
    decoded = unquote_to_bytes(raw_path) if _PERCENT in raw_path else raw_path
    return any(seg in _DOT_SEGMENTS for seg in decoded.replace(b"\\", b"/").split(b"/"))


def is_ambiguous_path(raw_path: bytes) -> bool:
    """True for a path that upstream servers read differently, one of them as a dot
    segment where the proxy sees none (``has_dot_segment`` has the plain ones):

    - a dot segment with path parameters, ``..;x`` or ``.;`` (also ``%3b``): Tomcat and
      Spring drop a segment's ``;params`` before resolving dot segments, so
      ``/api/..;/admin`` leaves the upstream's base path;
    - a dot segment once decoded a second time or more (``%252e%252e``, ``..%252f``), for
      upstreams (and the frameworks behind them) that decode again;
    - overlong UTF-8 (``%c0%ae``, ``%c0%af``, ``%e0%80%ae``, ``%c1%9c``): invalid, and read
      as ``.``, ``/`` and ``\\`` by lenient decoders;
    - a dot segment once IIS's ``%uXXXX`` escapes are read (``%u002e%u002e``,
      ``..%u2215``, ``%u00252e``: a dot, slash, backslash or percent sign, or a lookalike
      that Unicode compatibility or Windows' "best fit" turns into one), at any depth of
      decoding, or once such lookalikes sent as UTF-8 are (``%ef%bc%8e%ef%bc%8e``).

    A path with no ``%`` and no ``;`` (most paths) is answered at once.
    """
    if _PERCENT not in raw_path:
        if _SEMICOLON not in raw_path:
            return False
        decoded = raw_path
    else:
        decoded = unquote_to_bytes(raw_path)
    while True:
        if _SEMICOLON in decoded and _dot_segment_with_params_in(decoded):
            return True
        if _U_ESCAPE.search(decoded) is not None and _u_escapes_hide_dot_segment(decoded):
            return True
        if not decoded.isascii() and (
            _OVERLONG.search(decoded) is not None or _lookalikes_make_dot_segment(decoded)
        ):
            return True
        if _PERCENT not in decoded:
            return False
        # An IIS-style decoder reads "%u" escapes in the same pass (%u0025 is a "%").
        again = unquote_to_bytes(_U_ESCAPE.sub(_read_u_escape, decoded))
        if again == decoded:  # only "%" signs that escape nothing
            return False
        if _dot_segment_in(again):
            return True
        decoded = again  # shorter by two bytes an escape at least: this ends


def _dot_segment_in(decoded: bytes) -> bool:
    return any(seg in _DOT_SEGMENTS for seg in decoded.replace(b"\\", b"/").split(b"/"))


def _dot_segment_with_params_in(decoded: bytes) -> bool:
    return any(
        b";" in seg and seg.partition(b";")[0] in _DOT_SEGMENTS
        for seg in decoded.replace(b"\\", b"/").split(b"/")
    )


# IIS's "%uXXXX" escape (non-standard, decoded by IIS and ASP.NET): four hex digits.
_U_ESCAPE = re.compile(rb"%[uU]([0-9A-Fa-f]{4})")
# Characters that decoders read as ".", "/" or "\\" once a "%u" escape gives them: by
# Unicode compatibility (fullwidth and small forms: NFKC) or by Windows' "best fit" to an
# ANSI code page (division and fraction slashes, the set minus).
_LOOKALIKES = {
    0x25: b"%",
    0xFF05: b"%",  # fullwidth percent sign
    0xFE6A: b"%",  # small percent sign
    0x2025: b"..",  # two dot leader
    0xFE30: b"..",  # vertical two dot leader
    0x2E: b".",
    0x2F: b"/",
    0x5C: b"\\",
    0x2024: b".",  # one dot leader
    0xFE52: b".",  # small full stop
    0xFF0E: b".",  # fullwidth full stop
    0x2044: b"/",  # fraction slash
    0x2215: b"/",  # division slash
    0xFF0F: b"/",  # fullwidth solidus
    0x2216: b"\\",  # set minus
    0xFE68: b"\\",  # small reverse solidus
    0xFF3C: b"\\",  # fullwidth reverse solidus
}


def _u_escapes_hide_dot_segment(decoded: bytes) -> bool:
    """Whether ``%u`` escapes of dots, slashes and backslashes (or their lookalikes) make
    a dot segment of ``decoded`` once an IIS-style decoder reads them."""

    return _dot_segment_in(_U_ESCAPE.sub(_read_u_escape, decoded))


def _read_u_escape(escape: re.Match[bytes]) -> bytes:
    return _LOOKALIKES.get(int(escape[1], 16), b"_")


# The same lookalikes of ".", "/" and "\\" as UTF-8 (``%ef%bc%8e``, fullwidth full stop):
# read as such by a server that normalises paths or converts them to an ANSI code page.
_FOLD = {
    code: text.decode("ascii")
    for code, text in _LOOKALIKES.items()
    if code > 0x7F and text.strip(b"./\\") == b""
}


def _lookalikes_make_dot_segment(decoded: bytes) -> bool:
    """Whether UTF-8 lookalikes of dots, slashes and backslashes make a dot segment."""
    folded = decoded.decode("utf-8", "replace").translate(_FOLD)
    return _dot_segment_in(folded.encode("utf-8"))


def is_unsafe_path(raw_path: bytes) -> bool:
    """True for paths that must never be forwarded: not origin-form, control bytes, raw
    non-ASCII bytes, backslashes, or an encoded NUL."""
    if not raw_path.startswith(b"/") or _UNSAFE_RAW.search(raw_path) is not None:
        return True
    return b"%00" in raw_path


class PrefixRouter(Generic[T]):
    """Longest-prefix lookup of a raw path among ``{"/prefix": value}``."""

    def __init__(self, routes: Mapping[str, T]) -> None:
        self._table: dict[bytes, T] = {}
        self._root: T | None = None
        depth = 0
        for prefix, value in routes.items():
            if prefix == "/":
                self._root = value
                continue
            self._table[prefix.encode("ascii")] = value
            depth = max(depth, prefix.count("/"))
        self._max_depth = depth
        # First segments of all prefixes: most paths that match no pool are told apart by
        # one find, one slice and one set lookup.
        self._first = frozenset(p.split(b"/")[1] for p in self._table)

    @property
    def first_segments(self) -> frozenset[str] | None:
        """The prefixes' first segments, for a caller's own fast "no pool" test on a
        decoded path; None when a "/" pool takes every path."""
        if self._root is not None:
            return None
        return frozenset(segment.decode("ascii") for segment in self._first)

    def match(self, raw_path: bytes) -> tuple[int, T] | None:
        """Return ``(length of the matched raw prefix, value)``, or None.

        The rest of the path after the prefix is ``raw_path[length:]``.
        """
        first_end = raw_path.find(b"/", 1)
        first = raw_path[1:first_end] if first_end != -1 else raw_path[1:]
        if first not in self._first and _PERCENT not in first:
            return (0, self._root) if self._root is not None else None
        table = self._table
        ends = self._ends(raw_path)
        if ends and _PERCENT in raw_path[: ends[-1]]:
            found = self._match_decoded(raw_path, ends)
            if found is not None:
                return found
        else:
            for end in reversed(ends):
                value = table.get(raw_path[:end])
                if value is not None:
                    return end, value
        if self._root is not None:
            return 0, self._root
        return None

    def match_all(self, raw_path: bytes) -> list[tuple[int, T]]:
        """Every prefix ``raw_path`` is under, longest first (``/`` last), as ``match``
        finds the first: for routes that may decline a request, leaving it to a shorter
        prefix."""
        table = self._table
        found = [
            (end, value)
            for end, key in reversed(self._keys(raw_path, self._ends(raw_path)))
            if (value := table.get(key)) is not None
        ]
        if self._root is not None:
            found.append((0, self._root))
        return found

    def _ends(self, raw_path: bytes) -> list[int]:
        """Where each of the path's first ``max_depth`` segments ends."""
        ends: list[int] = []
        pos = 0
        for _ in range(self._max_depth):
            nxt = raw_path.find(b"/", pos + 1)
            if nxt == -1:
                ends.append(len(raw_path))
                break
            ends.append(nxt)
            pos = nxt
        return ends

    @staticmethod
    def _keys(raw_path: bytes, ends: list[int]) -> list[tuple[int, bytes]]:
        """The decoded prefix ending at each of ``ends``, up to a segment whose decoding
        holds a ``/`` (never a prefix: ``%2F`` does not split a segment)."""
        keys: list[tuple[int, bytes]] = []
        key = b""
        start = 0
        for end in ends:
            segment = raw_path[start + 1 : end]
            if b"%" in segment:
                segment = unquote_to_bytes(segment)
                if b"/" in segment:
                    break
            key += b"/" + segment
            keys.append((end, key))
            start = end
        return keys

    def _match_decoded(self, raw_path: bytes, ends: list[int]) -> tuple[int, T] | None:
        for end, candidate in reversed(self._keys(raw_path, ends)):
            value = self._table.get(candidate)
            if value is not None:
                return end, value
        return None
