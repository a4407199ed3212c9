"""nginx as a reference proxy: Debian's nginx on loopback, round robin over the upstreams.

The configuration is written into a temporary directory (pid file, logs and temp paths
there too), nginx runs in the foreground as a child of the harness and is stopped by PID
with the other servers. One worker process, like the Python servers; upstream keep-alive
connections as nginx's documentation recommends for a proxy (``keepalive`` +
HTTP/1.1 + an empty ``Connection`` header).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from bench_proxy import Server

CONFIG = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_body_buffer_size 128k;
    proxy_buffers 32 64k;
    proxy_max_temp_file_size 0;
    upstream pool {{
{servers}
        keepalive 128;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /api/ {{
            proxy_pass http://pool/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def available() -> bool:
    return shutil.which("nginx") is not None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(upstream_ports: Sequence[int], log_dir: Path, servers: list[Server]) -> Server:
    """Start nginx proxying ``/api/`` to the upstreams; appended to ``servers`` at once."""
    directory = log_dir / "nginx"
    directory.mkdir()
    port = _free_port()
    upstreams = "\n".join(f"        server 127.0.0.1:{p};" for p in upstream_ports)
    conf = directory / "nginx.conf"
    conf.write_text(CONFIG.format(dir=directory, servers=upstreams, port=port))
    log_path = log_dir / "nginx.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                shutil.which("nginx") or "nginx",
                "-p",
                str(directory),
                "-c",
                str(conf),
                "-e",
                str(directory / "error.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Server("nginx", port, process, directory / "error.log")
    servers.append(server)
    return server
