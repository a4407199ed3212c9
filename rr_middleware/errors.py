"""Every failure the proxy names, one class each, and what the client gets for it.

The tree (httpx's ``_exceptions.py`` is the model):

    FieldError (ValueError)           a configuration value is wrong (at construction)
    ProxyError
    ├── UpstreamError                 an exchange with an upstream failed
    │   ├── NoUpstream                    none could be picked (all tried, or none there)
    │   ├── PoolTimeout                   no connection slot within pool_timeout
    │   ├── ConnectFailed                 refused, unreachable, DNS, TLS
    │   │   └── ConnectTimeout            not connected within connect_timeout
    │   ├── UpstreamTimeout               silent within timeout (headers, body, upload)
    │   ├── RequestNotForwardable         this transport cannot put the request on the wire
    │   └── UpstreamBroken                the connection broke after the request went out
    │       └── UpstreamProtocolError     the answer is not HTTP/1.x
    ├── ClientBodyError               the client ended its request body early
    │   ├── ClientDisconnected            it left
    │   ├── BodyTooLarge                  past max_body_size
    │   └── ClientBodyTimeout             it paused past client_body_timeout
    └── ResponseAborted               the response had started: the client connection is cut

Each class says, as class attributes, what the proxy does with it: ``status`` is the
client's answer while no response has started (0: none, the client is gone), ``kind`` the
name of an upstream failure in logs and metrics, ``sent`` whether any of the request can
have reached the upstream (so whether a retry is safe), ``retriable`` whether another
upstream may be tried at all, ``counts`` whether it is held against the upstream's health.
Nothing maps failures by comparing strings, and no code changes an error's attributes.
"""

from __future__ import annotations

__all__ = [
    "BodyTooLarge",
    "ClientBodyError",
    "ClientBodyTimeout",
    "ClientDisconnected",
    "ConnectFailed",
    "ConnectTimeout",
    "FieldError",
    "NoUpstream",
    "PoolTimeout",
    "ProxyError",
    "RequestNotForwardable",
    "ResponseAborted",
    "UpstreamBroken",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class FieldError(ValueError):
    """One option has a wrong value: ``field`` is its name (the keyword argument, and the
    gateway's TOML key), ``problem`` what is wrong with it. ``str()`` is the message the
    Python API gives; the gateway prints ``problem`` after the key path instead, so no
    caller has to find the option's name in the text.

    >>> error = FieldError("retries", "must be an integer >= 0, got -1")
    >>> str(error), error.field
    ('retries must be an integer >= 0, got -1', 'retries')
    """

    def __init__(self, field: str, problem: str, message: str | None = None) -> None:
        super().__init__(f"{field} {problem}" if message is None else message)
        self.field = field
        self.problem = problem

    @classmethod
    def of(cls, owner: str, field: str, problem: str) -> FieldError:
        """The Python message names the option's owner: ``"health check rise must ..."``."""
        return cls(field, problem, f"{owner} {field} {problem}" if owner else None)


class ProxyError(Exception):
    """A proxied exchange could not be completed. ``status``: what the client is answered
    while no response has started (0: nothing, it is gone)."""

    status = 502


# --------------------------------------------------------------------------- upstream


class UpstreamError(ProxyError):
    """An exchange with an upstream failed. ``kind`` names the failure in logs and
    metrics; ``sent`` is False when nothing of the request can have reached the upstream;
    ``retriable`` is False when no other upstream may be tried; ``counts`` is False for
    failures that say nothing about the upstream's health."""

    kind = "error"
    sent = True
    retriable = True
    counts = True


class NoUpstream(UpstreamError):
    """No upstream could be picked: every one was tried, or the pool has none."""

    kind = "no_upstream"
    status = 502
    sent = False
    counts = False


class PoolTimeout(UpstreamError):
    """No connection to the upstream became free within ``pool_timeout``: a busy
    upstream, not an unhealthy one."""

    kind = "pool_timeout"
    status = 503
    sent = False
    counts = False


class ConnectFailed(UpstreamError):
    """The connection could not be made (refused, unreachable, DNS, TLS)."""

    kind = "connect"
    sent = False


class ConnectTimeout(ConnectFailed):
    """The connection was not made within ``connect_timeout``."""

    kind = "connect_timeout"
    status = 504


class UpstreamTimeout(UpstreamError):
    """The upstream was silent within ``timeout``: no response headers, a pause in the
    body, or none of the request body taken (nginx's ``proxy_send_timeout``)."""

    kind = "timeout"
    status = 504
    retriable = False  # a silent upstream costs the client one timeout, not one per retry


class RequestNotForwardable(UpstreamError):
    """This transport cannot express the request on the wire (say, header bytes its client
    library would re-encode); nothing was sent, and no upstream would do better."""

    kind = "request"
    status = 400
    sent = False
    retriable = False
    counts = False


class UpstreamBroken(UpstreamError):
    """The connection broke after the request was (maybe) sent."""

    kind = "reset"


class UpstreamProtocolError(UpstreamBroken):
    """The upstream's answer is not valid HTTP/1.x (a malformed or oversized head or
    trailer, a final status outside 200..599, another protocol version)."""

    kind = "protocol"


# --------------------------------------------------------------------------- client


class ClientBodyError(ProxyError):
    """The client's side ended the request body before it was whole."""

    status = 0


class ClientDisconnected(ClientBodyError):
    """The client went away while its request body was being read."""


class BodyTooLarge(ClientBodyError):
    """The client's body passed the pool's ``max_body_size``."""

    status = 413


class ClientBodyTimeout(ClientBodyError):
    """The client sent nothing of its body for ``client_body_timeout`` seconds: a stalled
    upload, or a slow-upload attack."""

    status = 408


# --------------------------------------------------------------------------- response


class ResponseAborted(ProxyError):
    """The exchange failed after the response had started (the upstream broke mid-body,
    or the client stopped reading): the ASGI app raises this so the server cuts the client
    connection, and the client sees an incomplete response, never a complete wrong one."""

    status = 0
