"""Run ``wrk`` once and parse what it prints."""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)\s*$", re.MULTILINE)
_PERCENTILE = re.compile(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s+(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


class WrkError(RuntimeError):
    """wrk failed or printed something this parser does not understand."""


@dataclass
class WrkResult:
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    # wrk prints these lines only when the count is not zero.
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx_3xx: int = 0

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx_3xx

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "errors": self.errors}


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse(output: str) -> WrkResult:
    """Parse the output of ``wrk --latency``."""
    rps = _RPS.search(output)
    requests = _REQUESTS.search(output)
    if rps is None or requests is None:
        raise WrkError(f"no Requests/sec or request count in wrk output:\n{output}")
    percentiles = {int(m[1]): _to_ms(m[2], m[3]) for m in _PERCENTILE.finditer(output)}
    if 50 not in percentiles or 99 not in percentiles:
        raise WrkError(f"no 50%/99% latency lines (was --latency given?):\n{output}")
    socket_errors: dict[str, int] = {}
    found = _SOCKET_ERRORS.search(output)
    if found is not None:
        names = ("connect", "read", "write", "timeout")
        socket_errors = {
            name: int(n) for name, n in zip(names, found.groups(), strict=True) if int(n)
        }
    non_2xx = _NON_2XX.search(output)
    return WrkResult(
        requests_per_sec=float(rps[1]),
        p50_ms=percentiles[50],
        p99_ms=percentiles[99],
        requests=int(requests[1]),
        duration_s=_to_ms(requests[2], requests[3]) / 1000.0,
        socket_errors=socket_errors,
        non_2xx_3xx=int(non_2xx[1]) if non_2xx is not None else 0,
    )


def run(
    url: str,
    *,
    duration: int,
    connections: int,
    threads: int = 1,
    script: str | None = None,
    timeout_s: int | None = None,
) -> WrkResult:
    """``wrk -t{threads} -c{connections} -d{duration}s --latency [-s script] URL``, parsed
    (wrk takes whole seconds only). ``timeout_s``: wrk's per-request timeout (its default
    is 2 s; slow, large exchanges need more, or they count as timeouts)."""
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency"]
    if script is not None:
        command += ["-s", script]
    if timeout_s is not None:
        command += ["--timeout", f"{timeout_s}s"]
    command.append(url)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:  # run() kills wrk before raising
        raise WrkError(f"wrk did not finish: {' '.join(command)}") from exc
    if done.returncode != 0:
        raise WrkError(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr}")
    return parse(done.stdout)
