"""nginx serving a folder on a free loopback port: the one HTTP server of the tests, the benchmarks and the smoke
training.

nginx rather than a Python server because it is what shards are served with in practice (keep-alive, Range
requests, sendfile) and because it costs the measured process tree nothing. Its access log is the record of what
the clients asked for: one line a request, with the TCP connection it came on, when it ended, how long it took,
its status and the body bytes sent.

    with LoopbackNginx(folder) as srv:
        mark = srv.mark()
        urllib.request.urlopen(f"{srv.url}/index.json").read()
        srv.since(mark)       # [Request(path='/index.json', ...)]
        srv.requests()        # Counter({'/index.json': 1})
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

__all__ = ["LoopbackNginx", "Request", "find_nginx"]

# One format carries what every user needs: the connection (keep-alive checks), the end time and duration (which
# requests came before a benchmark's first batch), the status and the bytes, and the request line (the path).
LOG_FORMAT = '$connection $msec $request_time $status $body_bytes_sent "$request"'
_LINE = re.compile(r'(\d+) (\S+) (\S+) (\d+) (\d+) "GET (\S+) [^"]*"')
SETTLE_S = 0.2  # nginx logs a request once its response is sent, which can be just after the client has it all


@dataclass
class Request:
    """One GET request from the access log."""

    path: str  # as in the request line (with its query string, if any)
    start: float  # wall-clock seconds (time.time()) when nginx began reading the request
    end: float  # when the response was complete
    status: int
    bytes: int  # body bytes sent
    connection: int = 0  # nginx's serial number of the TCP connection


def find_nginx() -> str | None:
    """The nginx binary (PATH, then Debian's /usr/sbin, often not on a user's PATH), or None."""
    path = shutil.which("nginx") or "/usr/sbin/nginx"
    return path if os.path.exists(path) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its children so far: nginx's master and workers are not
    waited-for children of ours until the end, so getrusage cannot see them."""
    pids = [pid]
    try:  # the master is single-threaded: its main thread's children are all the workers
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    ticks = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


class LoopbackNginx:
    """nginx serving ``root`` at ``url`` (http://127.0.0.1:<free port>) until ``stop()``.

    Its config, pid file and logs live in a temporary folder (``prefix``) removed on stop. Raises RuntimeError,
    with nginx's error log, when nginx is not installed or does not start.
    """

    def __init__(self, root: str, timeout: float = 10.0):
        nginx = find_nginx()
        if nginx is None:
            raise RuntimeError("nginx not found: install it (`make system-deps`, or apt-get install nginx)")
        self.root = os.path.abspath(root)
        self.prefix = tempfile.mkdtemp(prefix="vlms-nginx-")
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = os.path.join(self.prefix, "access.log")
        self.conf = os.path.join(self.prefix, "nginx.conf")
        os.makedirs(os.path.join(self.prefix, "logs"), exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # workers must read root's (and the tests' private) files
        with open(self.conf, "w") as f:
            f.write(f"""{user}
worker_processes 1;
worker_shutdown_timeout 2s;
pid {self.prefix}/nginx.pid;
error_log {self.prefix}/error.log;
events {{ worker_connections 256; }}
http {{
  log_format vlms '{LOG_FORMAT}';
  access_log {self.log} vlms;
  client_body_temp_path {self.prefix}; proxy_temp_path {self.prefix}; fastcgi_temp_path {self.prefix};
  uwsgi_temp_path {self.prefix}; scgi_temp_path {self.prefix};
  sendfile on; tcp_nopush on;  # as Debian's stock nginx.conf
  keepalive_requests 10000;
  types {{ application/json json; application/x-tar tar; }}
  server {{ listen 127.0.0.1:{self.port}; root {self.root}; location / {{ }} }}
}}
""")
        # stderr to a file, not a pipe: nothing has to drain it while nginx runs.
        self._stderr = open(os.path.join(self.prefix, "stderr.log"), "wb")
        self.proc = subprocess.Popen([nginx, "-p", self.prefix, "-c", self.conf, "-g", "daemon off;"],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        deadline = time.time() + timeout
        while not self._listening():
            if self.proc.poll() is not None or time.time() > deadline:
                why = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not listening after {timeout:.0f} s")
                errors = self._errors()
                self.stop()
                raise RuntimeError(f"nginx did not start on port {self.port} ({why}): {errors or 'no error logged'}")
            time.sleep(0.05)

    def _listening(self) -> bool:
        """nginx is up: it has written its pid file (after binding the port, so whoever answers there is it) and
        accepts connections."""
        if not os.path.exists(os.path.join(self.prefix, "nginx.pid")):
            return False
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def _errors(self) -> str:
        """What nginx wrote to stderr (before it reads its config) and to its error log."""
        text = []
        for name in ("stderr.log", "error.log"):
            try:
                with open(os.path.join(self.prefix, name), errors="replace") as f:
                    text.append(f.read().strip())
            except OSError:
                pass
        return "\n".join(t for t in text if t)

    # ------------------------------------------------------------------------------------------ the access log

    def mark(self) -> int:
        """A place in the access log, for ``since``: requests answered before now come before it (waits for their
        log lines)."""
        time.sleep(SETTLE_S)
        return os.path.getsize(self.log) if os.path.exists(self.log) else 0

    def _lines(self, mark: int = 0) -> list[str]:
        time.sleep(SETTLE_S)
        try:
            with open(self.log, "rb") as f:
                f.seek(mark)
                return f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def since(self, mark: int = 0) -> list[Request]:
        """GET requests logged after ``mark`` (by default all), in the order their responses completed."""
        out = []
        for line in self._lines(mark):
            m = _LINE.match(line)
            if m:
                end, took = float(m.group(2)), float(m.group(3))
                out.append(Request(m.group(6), end - took, end, int(m.group(4)), int(m.group(5)), int(m.group(1))))
        return out

    def requests(self) -> Counter:
        """GET requests so far, counted per path (subtract an earlier Counter for those in between)."""
        return Counter(r.path for r in self.since())

    def connections(self) -> int:
        """Distinct TCP connections that carried requests so far (keep-alive reuses one for many requests)."""
        return len({line.split()[0] for line in self._lines() if line.strip()})

    def cpu(self) -> float:
        """CPU seconds used so far by nginx (master and worker): a benchmark's server-side cost."""
        return _tree_cpu(self.proc.pid)

    # ---------------------------------------------------------------------------------------------- stopping

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGQUIT: open responses finish, within worker_shutdown_timeout), then a kill if it
        hangs; removes the temporary folder. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        shutil.rmtree(self.prefix, ignore_errors=True)

    close = stop

    def __enter__(self) -> LoopbackNginx:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
