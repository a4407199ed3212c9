"""How the proxy speaks TLS to ``https://`` upstreams: whom it trusts, what it presents.

A ``TLS`` value is configuration, as ``HealthCheck`` is: which CA signs the upstreams'
certificates (``ca_file``, instead of the system's), the client certificate for upstreams
that require one (``cert_file`` + ``key_file``: mutual TLS), the name to verify and send
as SNI when it is not the URL's host (``server_name``: an upstream reached by address),
and ``verify=False`` to trust anything (tests, a migration; never across a network you
do not control). The files are loaded once, when the value is built, so a missing file or
a key that does not match its certificate is an error at start-up naming the option and
the file, not a 502 on the first request. Two values with the same paths but files
renewed in between are not equal: a reload takes renewed certificates.

``Pool(tls=...)`` applies to every upstream of the pool, ``Upstream(tls=...)`` to one
(and wins); the balancer gives each distinct ``TLS`` a built-in ``Http1Transport`` of its
own, opened and closed with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FieldError

__all__ = ["TLS"]


@dataclass(frozen=True)
class TLS:
    """TLS to upstreams: the CA to trust, the client certificate to present, the name to
    verify.

    >>> TLS(verify=False).context().verify_mode == ssl.CERT_NONE
    True
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    verify: bool = True
    _context: ssl.SSLContext = field(init=False, repr=False, compare=False, hash=False)
    #: A digest of the files' contents: the same paths holding renewed certificates are
    #: other settings, so a reload takes them (and the transport made for the old ones
    #: is not reused).
    _contents: str = field(init=False, repr=False, compare=True, hash=True)

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file", "server_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise FieldError.of("tls", name, f"must be a non-empty string, got {value!r}")
        if not isinstance(self.verify, bool):
            raise FieldError.of("tls", "verify", f"must be True or False, got {self.verify!r}")
        if (self.cert_file is None) != (self.key_file is None):
            name = "key_file" if self.cert_file is None else "cert_file"
            other = "cert_file" if self.cert_file is None else "key_file"
            raise FieldError.of("tls", name, f"needs {other} beside it (both or neither)")
        object.__setattr__(self, "_context", self._build())
        digest = hashlib.sha256()
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None:
                with contextlib.suppress(OSError):  # loaded just now; gone since: no matter
                    digest.update(Path(path).read_bytes())
            digest.update(b"\0")
        object.__setattr__(self, "_contents", digest.hexdigest())

    def _build(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self.ca_file is not None:
            try:
                context.load_verify_locations(cafile=self.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise _unloadable("ca_file", self.ca_file, exc) from None
        if self.cert_file is not None and self.key_file is not None:
            try:
                context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as exc:
                where = f"{self.cert_file}' with '{self.key_file}"
                raise _unloadable("cert_file", where, exc) from None
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def context(self) -> ssl.SSLContext:
        """The ``ssl.SSLContext`` these settings make (built once)."""
        return self._context


def _unloadable(name: str, path: str, exc: OSError | ssl.SSLError) -> FieldError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return FieldError.of("tls", name, f"'{path}' cannot be loaded: {reason}")
