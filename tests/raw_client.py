"""A raw HTTP/1.1 client, for what httpx would normalise on the way out or in: it sends
exactly the bytes it is given, and reads responses strictly (whatever arrives first must
be the start of a response, so stray body bytes of a previous one are caught)."""

from __future__ import annotations

import socket

Headers = list[tuple[bytes, bytes]]


class RawClient:
    """A blocking HTTP/1.1 client on one TCP connection that sends exactly the given bytes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed; unparsed bytes: {self.buffer[:200]!r}")
        self.buffer += data

    def read_head(self) -> tuple[int, Headers]:
        """Read one status line and header block. Whatever arrives first must be the start
        of a response, so stray body bytes of a previous response are detected."""
        while b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) >= 5:
                assert self.buffer.startswith(b"HTTP/"), self.buffer[:200]
            self._fill()
        assert self.buffer.startswith(b"HTTP/1.1 "), self.buffer[:200]
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        return status, headers

    def read_exact(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def read_body(self, headers: Headers) -> bytes:
        found = dict(headers)
        if found.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while size := int(self.read_line().split(b";")[0], 16):
                body += self.read_exact(size)
                assert self.read_exact(2) == b"\r\n"
            while self.read_line():  # trailers
                pass
            return body
        return self.read_exact(int(found.get(b"content-length", b"0")))

    def request(self, data: bytes) -> tuple[int, Headers, bytes]:
        self.send(data)
        status, headers = self.read_head()
        return status, headers, self.read_body(headers)


def raw_request(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
