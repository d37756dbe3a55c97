"""Real servers on loopback for the shards-by-URL tests: Python's http.server over a folder, moto's S3 server.

    with HttpServer(folder) as http:          # http.url == "http://127.0.0.1:PORT"
        ...
    with S3Server() as s3:                    # s3.env: dummy credentials + AWS_ENDPOINT_URL for s3fs
        s3.put(local_folder, "bucket/shards")
        s3.pause(); ...; s3.resume()          # SIGSTOP / SIGCONT: a server that stops answering

Each server listens on 127.0.0.1 on a free port, is started by the fixture that uses it and stopped by
it (its pid, never a name); it dies with the test process too (PR_SET_PDEATHSIG), so no server outlives
a test run. PR_SET_PDEATHSIG follows the thread that started the server: start servers from the test's
main thread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from helpers import free_port
from mmer_dist.lifecycle import die_with_parent


class LoopbackServer:
    """A server subprocess on 127.0.0.1:port; `ready` is the path that answers once it serves."""

    def __init__(self, cmd: list[str], port: int, ready: str = "/", log: Path | None = None) -> None:
        self.cmd, self.port, self.ready, self.log = cmd, port, ready, log
        self.proc: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 60.0) -> "LoopbackServer":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        parent = os.getpid()
        self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                     preexec_fn=lambda: die_with_parent(parent))
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd} exited with {self.proc.returncode}")
            try:
                urllib.request.urlopen(self.url + self.ready, timeout=1).close()
                return self
            except urllib.error.HTTPError:
                return self                   # it answers (e.g. 404 for "/"): serving
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.cmd} did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)       # a paused server cannot handle SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pause(self) -> None:
        """Stop answering (SIGSTOP): connections are accepted by the kernel, nothing is read or sent."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class HttpServer(LoopbackServer):
    """`python -m http.server` serving `folder` (GET and HEAD; no range requests, like many plain servers)."""

    def __init__(self, folder: Path, port: int = 0, log: Path | None = None) -> None:
        port = port or free_port()
        super().__init__([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(folder),
                          str(port)], port, log=log)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_SESSION_TOKEN": "testing"}
"""Dummy credentials: moto accepts any; real ones never reach a test."""


class S3Server(LoopbackServer):
    """moto's S3 server (`python -m moto.server`, state in memory); `env` points s3fs at it."""

    def __init__(self, port: int = 0, log: Path | None = None) -> None:
        port = port or free_port()
        super().__init__([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], port,
                         ready="/moto-api/", log=log)
        self.env = {**S3_ENV, "AWS_ENDPOINT_URL": self.url}     # for the clients (s3fs finds the endpoint there)

    def fs(self) -> Any:
        import s3fs

        return s3fs.S3FileSystem(key=S3_ENV["AWS_ACCESS_KEY_ID"], secret=S3_ENV["AWS_SECRET_ACCESS_KEY"],
                                 endpoint_url=self.url, skip_instance_cache=True)

    def put(self, folder: Path, dest: str) -> None:
        """Upload a shards folder to `dest` (bucket/prefix), creating the bucket; index.json last."""
        fs = self.fs()
        bucket = dest.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        for p in sorted(files, key=lambda p: p.name == "index.json"):
            fs.put_file(str(p), f"{dest}/{p.relative_to(folder).as_posix()}")
