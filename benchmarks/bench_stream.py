"""Streaming through the proxy: big downloads and uploads, memory, and backpressure.

A raw-socket HTTP/1.1 client (no parsing beyond the head, 1 MiB ``recv_into``/``send``
buffers, so it is not the bottleneck) moves ``nbytes`` through the proxy and, for
contrast, to the upstream directly. While it runs, a thread samples the proxy process's
resident set (``VmRSS`` in ``/proc/PID/status``, every 20 ms); the figure is the peak
minus the value just before the transfer.

The slow client reads ``/download`` at a fixed rate (1 MiB/s) for a bounded time. The
upstream counts the bytes uvicorn has taken from it (``/sent``): if the proxy applies
backpressure, that count stays within socket buffers of what the client has read, and
stops growing faster than the client reads.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

MIB = 1024 * 1024
_BUFFER = MIB


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class PeakRss:
    """Samples the summed RSS of processes (a server and its workers) in a thread while in
    the ``with`` block."""

    def __init__(self, *pids: int, interval: float = 0.02) -> None:
        self.pids = pids
        self.interval = interval
        self.baseline = self._rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._rss())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def _connect(port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_head(sock: socket.socket) -> tuple[int, int, bytes, dict[bytes, bytes]]:
    """Status, Content-Length, the body bytes read past the head, and the headers."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed in the response head: {data[:200]!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"-1"))
    return status, length, rest, headers


@dataclass
class Transfer:
    nbytes: int
    seconds: float

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / MIB / self.seconds


def download(port: int, path: str, nbytes: int, timeout: float = 120.0) -> Transfer:
    """GET ``path?bytes=nbytes`` and read the whole body as fast as possible."""
    with _connect(port, timeout) as sock:
        start = time.perf_counter()
        sock.sendall(f"GET {path}?bytes={nbytes} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, length, rest, _ = _read_head(sock)
        if status != 200 or length != nbytes:
            raise RuntimeError(f"GET {path}: status {status}, length {length}")
        got = len(rest)
        buffer = bytearray(_BUFFER)
        while got < nbytes:
            n = sock.recv_into(buffer)
            if not n:
                raise ConnectionError(f"GET {path}: closed after {got} of {nbytes} bytes")
            got += n
        return Transfer(got, time.perf_counter() - start)


def upload(
    port: int, path: str, nbytes: int, timeout: float = 120.0, chunked: bool = False
) -> Transfer:
    """POST ``nbytes`` zero bytes (Content-Length framed, or chunked in 1 MiB chunks) and
    check the upstream saw them."""
    with _connect(port, timeout) as sock:
        start = time.perf_counter()
        framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {nbytes}"
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: bench\r\n{framing}\r\n\r\n".encode())
        zeros = bytes(_BUFFER)
        remaining = nbytes
        if chunked:
            framed = b"%x\r\n%s\r\n" % (_BUFFER, zeros)  # built once: the client is no bottleneck
            while remaining > 0:
                size = min(remaining, _BUFFER)
                sock.sendall(framed if size == _BUFFER else b"%x\r\n%s\r\n" % (size, zeros[:size]))
                remaining -= size
            sock.sendall(b"0\r\n\r\n")
        block = memoryview(zeros)
        while remaining > 0:
            remaining -= sock.send(block[: min(remaining, _BUFFER)])
        status, length, rest, _ = _read_head(sock)
        while len(rest) < length:
            rest += sock.recv(65536)
        if status != 200 or int(rest) != nbytes:
            raise RuntimeError(f"POST {path}: status {status}, upstream saw {rest[:50]!r}")
        return Transfer(nbytes, time.perf_counter() - start)


def chunked_upload(port: int, path: str, nbytes: int) -> Transfer:
    """``upload`` with a chunked body (no Content-Length)."""
    return upload(port, path, nbytes, chunked=True)


@dataclass
class SlowRead:
    seconds: float  # how long the client read
    client_read: int  # body bytes the client read
    upstream_sent: int  # bytes the upstream had handed to its server at the end
    sent_at_half: int  # ... halfway through
    rss_growth: int  # proxy's peak RSS minus its RSS before the request

    @property
    def ahead(self) -> int:
        """How far the upstream got ahead of the client: what sits in buffers."""
        return self.upstream_sent - self.client_read

    @property
    def late_rate(self) -> float:
        """The upstream's sending rate over the second half, bytes per second."""
        return (self.upstream_sent - self.sent_at_half) / (self.seconds / 2)


def _sent(upstream_port: int) -> int:
    with _connect(upstream_port, 10.0) as sock:
        sock.sendall(b"GET /sent HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        _, length, rest, _ = _read_head(sock)
        while len(rest) < length:
            rest += sock.recv(4096)
        return int(rest)


def slow_download(
    port: int, path: str, upstream_ports: dict[str, int], proxy_pid: int, rate: int, seconds: float
) -> SlowRead:
    """Read a download far larger than ``rate * seconds`` at ``rate`` bytes per second,
    for ``seconds``, then drop the connection. ``upstream_ports``: port per upstream name
    (the ``x-upstream`` header says which one answered)."""
    nbytes = 1024 * MIB  # never read to the end: the client leaves first
    tick = 0.05
    per_tick = int(rate * tick)
    with PeakRss(proxy_pid) as rss, _connect(port, 30.0) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(f"GET {path}?bytes={nbytes} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, _, rest, headers = _read_head(sock)
        if status != 200:
            raise RuntimeError(f"GET {path}: status {status}")
        upstream_port = upstream_ports[headers[b"x-upstream"].decode()]
        got = len(rest)
        start = next_tick = time.perf_counter()
        sent_at_half = -1
        while next_tick - start < seconds:
            if sent_at_half < 0 and next_tick - start >= seconds / 2:
                sent_at_half = _sent(upstream_port)
            want = per_tick
            while want > 0:
                n = len(sock.recv(want))
                if not n:
                    raise ConnectionError(f"GET {path}: closed after {got} bytes")
                got += n
                want -= n
            next_tick += tick
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        upstream_sent = _sent(upstream_port)
        elapsed = time.perf_counter() - start
    return SlowRead(elapsed, got, upstream_sent, sent_at_half, rss.growth)
