"""Where a shards folder lives: a local folder, a URL read through fsspec, or a `pipe:` command.

    loc = Location("s3://bucket/meld")        # also /scratch/meld, file:///scratch/meld, gs://b/meld,
                                              # https://host/meld, "pipe:aws s3 cp s3://b/meld/{shard} -"
    loc.read_bytes("index.json")              # a whole (small) file, with retries
    f = loc.open_stream("meld-train-000003.tar")   # front to back; resumes after a transient error
    loc.size("meld-train-000003.tar")         # bytes (None through a pipe: it cannot be asked)
    root = loc.cached(names, key=sha256)      # a node-local copy of some files (the local folder itself if local)
    loc.shown("meld-train-000003.tar")        # the URL for messages: credentials never appear in it

* One reader for every kind. Nothing is ever listed: the index names every file. `pipe:CMD` runs CMD
  with `{shard}` replaced by the file's path inside the shards folder (a tar, or `index.json` and
  `samples/{split}/{field}.npy` when the index is read), reading its standard output.
* Retries: a transient failure (connection refused or reset, a timeout, a 5xx, a pipe command that
  exits non-zero) is retried `RetryPolicy.attempts` times with exponential backoff, each retry reported
  on stderr; a stream reopens at the byte it had reached (seek, or re-read and skip where the source
  cannot seek). This is the only retry layer: s3fs's own is reduced to one attempt, so every retry is
  reported and the total wait is bounded once. A missing object is `ShardMissing` at once, naming its
  URL; when the attempts are spent, `ShardReadError` names the URL, the last error and the fix.
* Timeouts: `RetryPolicy.timeout_s` bounds connecting and every socket read (s3fs/botocore, aiohttp),
  so a server that stops answering is a retried error, not a hang.
* Credentials come only from each library's standard environment and files (AWS_* variables and
  ~/.aws for s3fs, GOOGLE_APPLICATION_CREDENTIALS for gcsfs, ~/.netrc for HTTP), never from a project
  config: a URL with a password or a query string is refused, and messages strip user info and query
  strings from every URL they show (also inside a pipe: command).
* The node cache (`cached`): files fetched once per node into `cache_root()` (data.cache_dir,
  $MMER_CACHE or ~/.cache/mmer_dist), under a folder keyed by the caller (the index's sha256, so a
  changed index is never served stale). One rank of a node fetches under an exclusive lock while the
  others wait for it; every file is written to a temp name, fsynced and renamed, so a killed fetch
  leaves no half file.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

T = TypeVar("T")
PLACEHOLDER = "{shard}"
"""In `pipe:CMD`: the path of the file inside the shards folder (`meld-train-000003.tar`, `index.json`)."""
CHUNK = 1 << 20


class ShardMissing(FileNotFoundError):
    """A file of a shards location does not exist (not retried): the message names its URL."""


class ShardReadError(OSError):
    """A file of a shards location could not be read after every retry: the message names its URL and the fix."""


@dataclass(frozen=True)
class RetryPolicy:
    """How reads of a remote location retry: `attempts` in all, waiting backoff_s, 2 x backoff_s, ... (at most
    max_backoff_s) between them; `timeout_s` bounds each connection and socket read."""

    attempts: int = 8
    backoff_s: float = 0.5
    max_backoff_s: float = 16.0
    timeout_s: float = 60.0

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))


def redact(text: str) -> str:
    """`text` with the user info and the query string of every URL in it removed (for messages)."""
    def one(m: re.Match) -> str:
        parts = urlsplit(m.group(0))
        host = parts.netloc.rsplit("@", 1)[-1]
        netloc = f"***@{host}" if "@" in parts.netloc else host
        return urlunsplit((parts.scheme, netloc, parts.path, "***" if parts.query else "", ""))
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", one, str(text))


def cache_root(cache_dir: str | Path = "") -> Path:
    """The node-local cache folder: `cache_dir`, else $MMER_CACHE, else ~/.cache/mmer_dist."""
    return Path(cache_dir or os.environ.get("MMER_CACHE") or "~/.cache/mmer_dist").expanduser()


def sync_command(folder: str, url: str) -> str:
    """The one line that uploads a finished shards folder to `url` with the standard tool, index.json last (a
    reader never sees an index before its shards) and no lock or temp files (dot files)."""
    dest = url.rstrip("/")
    if dest.startswith(("s3://", "s3a://")):
        return (f"aws s3 sync {folder} {dest} --exclude 'index.json' --exclude '.*' "
                f"&& aws s3 cp {folder}/index.json {dest}/index.json")
    if dest.startswith("gs://"):
        return (f"gsutil -m rsync -r -x '(^|.*/)\\..*|index\\.json$' {folder} {dest} "
                f"&& gsutil cp {folder}/index.json {dest}/index.json")
    return (f"rclone copy {folder} REMOTE:{dest.split('://', 1)[-1]} --exclude index.json --exclude '.*' "
            f"&& rclone copy {folder}/index.json REMOTE:{dest.split('://', 1)[-1]}")


def local_output(out: str | Path, flag: str = "--out") -> Path:
    """`out` as a local folder; a URL is refused with the upload command (why: the README, "Shards by URL")."""
    if str(out).startswith("pipe:"):
        raise ValueError(f"{flag} {redact(str(out))}: a pipe: location is read-only; write to a folder")
    loc = Location(out)
    if loc.is_local:
        return loc.root
    raise ValueError(f"{flag} {redact(str(out))}: packing writes a local folder (each shard to a temp file, fsync, "
                     f"rename, its stats last: what lets an interrupted run resume), which object storage cannot do. "
                     f"Write to a local or cluster folder, then upload it in one line, e.g.\n  "
                     f"{sync_command('OUT', redact(str(out)))}")


_PERMANENT = (ValueError, TypeError, ImportError, NotADirectoryError, IsADirectoryError, PermissionError)
_PERMANENT_NAMES = {"NoCredentialsError", "PartialCredentialsError", "InvalidConfigError", "ParamValidationError"}


def _permanent(e: BaseException) -> bool:
    return isinstance(e, _PERMANENT) or type(e).__name__ in _PERMANENT_NAMES


def _hint(e: BaseException) -> str:
    """The fix of a permanent failure, when there is a usual one."""
    if isinstance(e, ImportError):
        return " (s3:// and gs:// come with pip install 'mmer_dist[s3]' / 'mmer_dist[gcs]')"
    if isinstance(e, PermissionError) or "Credentials" in type(e).__name__:
        return " (check the credentials in the environment, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS or ~/.netrc)"
    return ""


def _call(fn: Callable[[], T]) -> T:
    """fn(), with fsspec's two meanings of FileNotFoundError told apart: "no such object" (no cause, or a 404
    as its cause) becomes ShardMissing; "the server cannot be reached" (fsspec's HTTP client raises it with the
    connection error as its cause) a ConnectionError, which is retried."""
    try:
        return fn()
    except FileNotFoundError as e:
        cause = e.__cause__
        if cause is None or getattr(cause, "status", None) in (404, 410):
            raise ShardMissing(str(e)) from None
        raise ConnectionError(f"cannot reach the server ({type(cause).__name__}: {cause})") from e


class Location:
    """A shards folder: `spec` is a local path, an fsspec URL or `pipe:CMD` with `{shard}` (module docstring).

    Picklable (a DataLoader worker opens its own filesystem client)."""

    def __init__(self, spec: str | Path, cache_dir: str | Path = "", policy: RetryPolicy = RetryPolicy()) -> None:
        self.spec, self.cache_dir, self.policy = str(spec), str(cache_dir), policy
        if self.spec.startswith("pipe:"):
            self.kind, self.protocol = "pipe", "pipe"
            if PLACEHOLDER not in self.spec:
                raise ValueError(f"data.shards={redact(self.spec)}: a pipe: command needs {PLACEHOLDER} where the "
                                 f"file name goes, e.g. 'pipe:aws s3 cp s3://bucket/shards/{PLACEHOLDER} -'")
        elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", self.spec):
            self.protocol = self.spec.split("://", 1)[0].lower()
            self.kind = "local" if self.protocol == "file" else "fsspec"
            parts = urlsplit(self.spec)
            if parts.password or parts.query or parts.fragment:
                raise ValueError(f"{redact(self.spec)}: a shards URL names a folder, with no password, query string "
                                 f"or fragment. Credentials come from the storage library's own environment and files "
                                 f"(AWS_ACCESS_KEY_ID / ~/.aws/credentials, GOOGLE_APPLICATION_CREDENTIALS, ~/.netrc "
                                 f"for HTTP), never from data.shards")
        else:
            self.kind, self.protocol = "local", "file"
        self._fs: Any = None
        self._pid = -1

    # ------------------------------------------------------------------ naming

    @property
    def is_local(self) -> bool:
        """A folder of this machine's filesystem (a path or file://): random access by pread works."""
        return self.kind == "local"

    @property
    def root(self) -> Path:
        """The local folder (only when `is_local`)."""
        if not self.is_local:
            raise ValueError(f"{self.shown()} is not a local folder")
        return Path(urlsplit(self.spec).path if self.spec.startswith("file://") else self.spec)

    def url(self, name: str) -> str:
        """The full address of file `name` (a local path, a URL, or the command that prints it)."""
        if self.kind == "pipe":
            return self.spec[len("pipe:"):].replace(PLACEHOLDER, name)
        if self.is_local:
            return str(self.root / name)
        return self.spec.rstrip("/") + "/" + name

    def shown(self, name: str = "") -> str:
        """`url(name)` (or the location itself) for messages and logs, credentials removed."""
        if not name:
            return redact(self.spec)
        return redact(f"`{self.url(name)}`" if self.kind == "pipe" else self.url(name))

    def __str__(self) -> str:
        return self.shown()

    # ------------------------------------------------------------------ reading

    def read_bytes(self, name: str) -> bytes:
        """The whole file `name` (index files: small), retried on transient errors."""
        with self.open_stream(name) as f:
            return f.read()

    def open_stream(self, name: str) -> io.BufferedReader:
        """A reader of file `name` front to back; opened lazily, reopened at its position after a transient error.
        Buffered by CHUNK: a tar reader's small reads would otherwise each cross into fsspec's event loop."""
        return io.BufferedReader(ResumableReader(self, name), CHUNK)

    def size(self, name: str) -> int | None:
        """Bytes of file `name` (one stat or HEAD request); None through a pipe. ShardMissing when absent."""
        if self.kind == "pipe":
            return None
        if self.is_local:
            try:
                return os.stat(self.url(name)).st_size
            except FileNotFoundError:
                raise ShardMissing(f"{self.shown(name)}: no such file") from None
        return int(self.retry(lambda: self.fs().size(self.url(name)), name))

    def retry(self, fn: Callable[[], T], name: str, recover: Callable[[], None] | None = None) -> T:
        """fn() with the retry policy: transient errors are reported and retried (after `recover()`),
        a missing file raises ShardMissing at once, the last failure ShardReadError."""
        p = self.policy
        for attempt in range(1, p.attempts + 1):
            try:
                return _call(fn)
            except ShardMissing:
                raise ShardMissing(f"{self.shown(name)}: not found (the index of {self.shown()} lists it; upload or "
                                   f"re-pack it, or point data.shards at the complete copy)") from None
            except Exception as e:
                if recover is not None:
                    recover()
                if _permanent(e):
                    raise ShardReadError(f"{self.shown(name)}: {type(e).__name__}: {redact(e)}{_hint(e)}") from e
                if attempt == p.attempts:
                    raise ShardReadError(
                        f"{self.shown(name)}: unreadable after {p.attempts} attempts over "
                        f"{sum(p.wait(a) for a in range(1, p.attempts)):.0f} s, last error {type(e).__name__}: "
                        f"{redact(e)}. Check that the server answers (and data.read_timeout_s / data.read_retries), "
                        f"or copy the shards to a filesystem") from e
                print(f"mmer_dist: {self.shown(name)}: {type(e).__name__}: {redact(e)[:200]}; retry {attempt} of "
                      f"{p.attempts - 1} in {p.wait(attempt):.1f} s", file=sys.stderr, flush=True)
                time.sleep(p.wait(attempt))
        raise AssertionError("unreachable")

    def _open_at(self, name: str, offset: int) -> IO[bytes]:
        """A raw stream of `name` positioned at byte `offset` (may raise; the caller retries)."""
        if self.is_local:
            f: IO[bytes] = open(self.url(name), "rb")
            f.seek(offset)
            return f
        if self.kind == "pipe":
            return _skip(_PipeStream(self.url(name)), offset)
        if self.protocol in ("http", "https"):
            # one streamed GET: plain HTTP servers need not answer range requests (Python's http.server does not)
            return _skip(self.fs().open(self.url(name), "rb", block_size=0), offset)
        f = self.fs().open(self.url(name), "rb")
        f.seek(offset)
        return f

    def fs(self) -> Any:
        """This process's fsspec filesystem for the URL (created on first use, again after a fork)."""
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            self._fs = fsspec.filesystem(self.protocol, **_client_options(self.protocol, self.policy.timeout_s))
            if hasattr(self._fs, "retries"):
                self._fs.retries = 1          # one retry layer: ours (module docstring)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None, "_pid": -1}

    # ------------------------------------------------------------------ node cache

    def cached(self, names: list[str], key: str) -> Path:
        """A local folder holding `names` (paths inside the location), copied once per node and `key`.

        The local folder itself when the location is local. Otherwise the files are fetched in order into
        `cache_root()/shards/{location}-{key}` under an exclusive lock (concurrent ranks of a node wait for
        the first), each through a temp file and a rename; files already there are kept."""
        if self.is_local:
            return self.root
        slug = re.sub(r"[^A-Za-z0-9]+", "_", self.shown().split("://", 1)[-1]).strip("_")[-80:]
        folder = cache_root(self.cache_dir) / "shards" / f"{slug}-{key[:16]}"
        if all((folder / n).exists() for n in names):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        with _Lock(folder.with_name(folder.name + ".lock")):
            for n in names:
                if not (folder / n).exists():
                    self.copy_to(n, folder / n)
        return folder

    def copy_to(self, name: str, dest: Path) -> None:
        """File `name` to the local path `dest`, atomically (temp file, fsync, rename)."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, self.open_stream(name) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _client_options(protocol: str, timeout_s: float) -> dict[str, Any]:
    """fsspec options that bound connecting and reading (no credentials: the libraries find those)."""
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                   sock_read=timeout_s), "trust_env": True}}
    if protocol in ("s3", "s3a"):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                  "retries": {"max_attempts": 1, "mode": "standard"}}}
    return {}


class ResumableReader(io.RawIOBase):
    """Sequential reads of one file of a `Location`; after a transient error it reopens at the byte it had
    reached, under the location's retry policy. `read` raises ShardMissing / ShardReadError."""

    def __init__(self, location: Location, name: str) -> None:
        super().__init__()
        self.location, self.name, self.pos = location, name, 0
        self._f: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        def attempt() -> bytes:
            if self._f is None:
                self._f = self.location._open_at(self.name, self.pos)
            return self._f.read() if size is None or size < 0 else self._f.read(size)

        data = self.location.retry(attempt, self.name, recover=self._drop)
        self.pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def _drop(self) -> None:
        if self._f is not None:
            try:
                self._f.close()
            except Exception:          # a broken connection may fail to close too; it is dropped either way
                pass
        self._f = None

    def close(self) -> None:
        self._drop()
        super().close()


def _skip(f: IO[bytes], offset: int) -> IO[bytes]:
    """`f` after reading and dropping its first `offset` bytes (sources that cannot seek)."""
    left = offset
    while left:
        chunk = f.read(min(left, CHUNK))
        if not chunk:
            f.close()
            raise OSError(f"the stream ended at byte {offset - left} while skipping to {offset}")
        left -= len(chunk)
    return f


class _PipeStream(io.RawIOBase):
    """The standard output of a shell command; at its end a non-zero exit status is an OSError (retried)."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command
        self._err = tempfile.TemporaryFile()           # a file, not a pipe: a chatty command never blocks on it
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._err)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert self._proc.stdout is not None
        data = self._proc.stdout.read() if size is None or size < 0 else self._proc.stdout.read(size)
        if not data or size is None or size < 0:
            status = self._proc.wait()
            if status != 0:
                self._err.seek(0)
                tail = self._err.read()[-300:].decode("utf-8", "replace").strip()
                raise OSError(f"the command exited with status {status}: {tail or '(no message)'}")
        return data

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._err.close()
        super().close()


class _Lock:
    """An exclusive flock on `path` held for a `with` block (blocking: the other ranks of the node wait)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> "_Lock":
        import fcntl

        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)                  # closing drops the flock; the file stays (unlinking it would race)
