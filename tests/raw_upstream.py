"""The raw upstream the tests use: ``rr_middleware.testing.raw``, the kit's own (one
harness for the project and its users). See that module's docstring."""

from __future__ import annotations

from rr_middleware.testing.raw import (
    Handler,
    Headers,
    RawConnection,
    RawRequest,
    RawUpstream,
    answer_each,
    answer_once,
    first_then,
)

__all__ = [
    "Handler",
    "Headers",
    "RawConnection",
    "RawRequest",
    "RawUpstream",
    "answer_each",
    "answer_once",
    "first_then",
]
