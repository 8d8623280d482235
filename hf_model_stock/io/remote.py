"""Reading safetensors shards over HTTP range requests, hashed as they arrive, never stored.

A merge reads each input byte once, in file order (the plan sorts tensors by base shard and offset),
so a remote shard is read as one sequential stream: ``RemoteShard`` fetches the whole file in
``PIECE_BYTES`` ranges, ``WINDOW`` of them at a time on a shared thread pool (several connections,
so that one slow connection does not set the pace), consumes them in order and feeds every byte
(header and gaps included) to a sha256 that is checked against the Hub's LFS oid once the file ends.
Bytes that will be read again (the first pass over a tensor merged in two passes), bytes skipped
ahead of the reads (a fine-tune laid out in another order) and pieces that arrive while a second pass
reads the spill (``RemoteShard.drain``: the connections should not idle meanwhile) are kept in a
temporary spill file, whose ranges are freed as soon as they have been read for the last time; no
other byte touches the disk. A merge that merely lags behind the network (the CPU sets the pace)
leaves the pieces in memory: spilling them would only add work.

Requests go through huggingface_hub's session (its auth headers, ``HF_TOKEN``, ``HF_ENDPOINT``).
The Hub answers a file's URL with a redirect to LFS/Xet storage (a signed URL on another host):
``Location`` asks once per file (``get_hf_file_metadata``), sends the ranges there without the Hub
token, and asks again when storage refuses an expired URL. Requests are retried with exponential
backoff on 408/429/5xx and on connection errors; a connection that drops mid-range is resumed from
the last byte received; a body read to its end leaves the connection in the session's pool for the
next range. A piece the reads wait for that lags far behind the others (a straggling connection, while
later pieces have arrived) is asked for again on another connection, and the first copy to arrive is
taken. A server that answers a range request with the whole file (HTTP 200) is refused, not
downloaded in full.

The sha256 state is OpenSSL's ``SHA256_CTX``, saved at each piece boundary (``StreamState``), so
that a resumed merge goes on hashing from where the stream was instead of fetching finished tensors
again.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import hashlib
import json
import logging
import mmap
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_model_stock.errors import CheckpointError, NetworkError, SourceError
from hf_model_stock.io.reader import ShardFiles, TensorInfo

logger = logging.getLogger(__name__)

PIECE_BYTES = 8 << 20  # bytes per range request
WINDOW = 4  # pieces per shard in flight or waiting to be consumed: memory is WINDOW * PIECE_BYTES per shard
RETRIES = 5  # per piece, for a connection that drops or times out mid-body
TIMEOUT_S = 60.0
STREAM_STATE_NAME = ".hfms-stream.jsonl"
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
SPILL_AHEAD = 64 << 20  # bytes per shard that may be fetched ahead of the reads into the spill file
STALL_S = 0.25  # a second pass that has not taken a byte of the stream for this long: drain
HEDGE_AFTER_S = 2.0  # a piece the reads wait for, slower than this and than HEDGE_FACTOR x the usual piece,
HEDGE_FACTOR = 4.0  # while a later piece has arrived, is asked for again on another connection
_backoff = time.sleep  # between retries (tests make it instant)


@dataclass(frozen=True)
class RemoteFile:
    """One remote file: where to GET it, its size and the hash the Hub gives for it (the LFS sha256,
    else the git blob sha1 of a file stored in git)."""

    url: str
    size: int
    repo_id: str
    filename: str
    revision: str
    sha256: str | None = None
    git_oid: str | None = None

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.revision[:12]}/{self.filename}"


# ----------------------------------------------------------------------------------------------
# A sha256 whose state can be saved


def _load_libcrypto() -> Any:
    name = ctypes.util.find_library("crypto")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if lib is None or not all(hasattr(lib, f) for f in ("SHA256_Init", "SHA256_Update", "SHA256_Final")):
        return None
    lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.SHA256_Init.argtypes = [ctypes.c_void_p]
    lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


_crypto = _load_libcrypto()
_CTX_BYTES = 112  # sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len (32-bit each)


class Hasher:
    """sha256 (or a git blob sha1) of a file fed in order; ``state`` saves a sha256 (None where it
    cannot: no libcrypto, or a sha1), ``Hasher(kind, state)`` restores it."""

    def __init__(self, kind: str = "sha256", size: int = 0, state: bytes | None = None):
        self.kind = kind
        self._ctx: ctypes.Array | None = None
        self._py: Any = None
        if kind == "sha256" and _crypto is not None:
            self._ctx = ctypes.create_string_buffer(_CTX_BYTES)
            if state is not None:
                ctypes.memmove(self._ctx, state, _CTX_BYTES)
            else:
                _crypto.SHA256_Init(self._ctx)
        elif kind == "sha256":
            if state is not None:
                raise ValueError("no libcrypto: a sha256 state cannot be restored")
            self._py = hashlib.sha256()
        else:  # git blob id: sha1 of "blob SIZE\0" + data
            if state is not None:
                raise ValueError("a git blob sha1 state cannot be restored")
            self._py = hashlib.sha1(b"blob %d\0" % size)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._ctx is None:
            self._py.update(data)
            return
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n:
            address = np.frombuffer(data, np.uint8).ctypes.data
            _crypto.SHA256_Update(self._ctx, ctypes.c_void_p(address), n)  # ctypes lets go of the GIL

    def state(self) -> bytes | None:
        return None if self._ctx is None else self._ctx.raw

    def hexdigest(self) -> str:
        if self._ctx is None:
            return self._py.hexdigest()
        out = ctypes.create_string_buffer(32)
        ctx = ctypes.create_string_buffer(self._ctx.raw, _CTX_BYTES)  # Final on a copy: the state stays usable
        _crypto.SHA256_Final(out, ctx)
        return out.raw.hex()


def can_save_hash_state() -> bool:
    return _crypto is not None


# ----------------------------------------------------------------------------------------------
# Range requests


class _Retry(Exception):
    """A transient failure: the connection dropped, timed out or ended short."""


class _Expired(Exception):
    """Storage refused a signed URL (it expired): ask the Hub for a new one."""


class _Either:
    """Set when any of its events is (the merge stopped, or this copy of a piece lost the race)."""

    def __init__(self, *events: threading.Event | None):
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _transient() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError, OSError, _Retry)


def hub_refused(file: RemoteFile, status: int) -> SourceError:
    """The one-line error for a 401/403 on ``file``: names its repo and how to log in."""
    return SourceError(f"{file.repo_id}: the Hub refused {file.filename} (HTTP {status}): log in with `hf auth login` "
                       "or set HF_TOKEN to a token that can read this repository")


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class Location:
    """Where a file's bytes are fetched from, and with which headers: the Hub's URL for a file stored
    in git; for one in LFS/Xet storage, the signed URL the Hub redirects to, without the Hub token
    (it must not leave the Hub). Asked once, and again after ``expire`` (storage refused the URL)."""

    def __init__(self, file: RemoteFile):
        self.file = file
        self._lock = threading.Lock()
        self._current: tuple[str, dict[str, str], int] | None = None
        self._asked = 0

    def get(self) -> tuple[str, dict[str, str], int]:
        """(url, headers, generation); ``generation`` identifies this answer for ``expire``."""
        with self._lock:
            if self._current is None:
                url, headers = self._ask()
                self._asked += 1
                self._current = (url, headers, self._asked)
            return self._current

    def expire(self, generation: int) -> None:
        with self._lock:
            if self._current is not None and self._current[2] == generation:
                self._current = None

    def _ask(self) -> tuple[str, dict[str, str]]:
        from huggingface_hub import get_hf_file_metadata
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers

        try:
            meta = get_hf_file_metadata(self.file.url, timeout=TIMEOUT_S, retry_on_errors=True)
        except HfHubHTTPError as exc:
            status = getattr(exc.response, "status_code", None)
            if status in (401, 403):
                raise hub_refused(self.file, status) from None
            if status == 404:
                raise SourceError(f"{self.file.where}: not found on the Hub (HTTP 404)") from None
            raise _Retry(f"HTTP {status} asking the Hub where {self.file.filename} is") from None
        headers = build_hf_headers()
        if _origin(meta.location) != _origin(self.file.url):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return meta.location, headers


@contextmanager
def _range_response(file: RemoteFile, start: int, end: int, where: Location) -> Iterator[Any]:
    """GET bytes [start, end] of ``file`` from ``where`` through huggingface_hub's session; the open
    response, checked to be exactly that range (``_Retry`` for a status worth retrying: 408, 429,
    5xx; ``_Expired`` when storage refuses its signed URL)."""
    from huggingface_hub.utils import get_session

    url, headers, generation = where.get()
    headers = {**headers, "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S) as response:
        status = response.status_code
        if status in RETRY_STATUS:
            raise _Retry(f"HTTP {status}")
        if status in (401, 403, 410) and _origin(url) != _origin(file.url):
            where.expire(generation)
            raise _Expired(f"HTTP {status} from storage")
        if status in (401, 403):
            raise hub_refused(file, status)
        if status == 404:
            raise SourceError(f"{file.where}: not found on the Hub (HTTP 404)")
        if status == 200:
            raise SourceError(
                f"{file.where}: the server ignored the Range header (HTTP 200 to a request for bytes {start}-{end}): "
                "--stream needs range requests; run without --stream to download the model instead")
        if status != 206:
            raise SourceError(f"{file.where}: HTTP {status} to a range request for bytes {start}-{end}")
        got = response.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {start}-{end}/"):
            raise SourceError(f"{file.where}: asked for bytes {start}-{end}, the server sent {got or 'no Content-Range'}")
        yield response


def fetch_range(file: RemoteFile, start: int, dest: memoryview, where: Location,
                count: Callable[[int], None] | None = None, cancelled: threading.Event | _Either | None = None) -> None:
    """Fill ``dest`` with the bytes of ``file`` from ``start``, fetched at ``where``; a connection that
    drops or stalls is resumed from the last byte received, ``RETRIES`` times with backoff; an expired
    storage URL is asked for again, ``RETRIES`` times."""
    got, failures, expired = 0, 0, 0
    transient = _transient()
    while got < len(dest):
        if cancelled is not None and cancelled.is_set():
            return
        try:
            with _range_response(file, start + got, start + len(dest) - 1, where) as response:
                for chunk in response.iter_raw():  # to the end of the body: the connection goes back to the pool
                    if cancelled is not None and cancelled.is_set():
                        return  # the merge stopped: nobody reads this piece
                    n = min(len(chunk), len(dest) - got)
                    dest[got:got + n] = chunk[:n]
                    got += n
                    if count is not None:
                        count(n)
            if got < len(dest):
                raise _Retry(f"the response ended after {got} of {len(dest)} bytes")
        except _Expired as exc:
            expired += 1
            if expired > RETRIES:
                raise NetworkError(f"{file.where}: storage refused the Hub's download URL {expired} times ({exc})") from None
        except transient as exc:
            failures += 1
            if failures > RETRIES:
                raise NetworkError(f"{file.where}: download failed {failures} times at byte {start + got} "
                                   f"({type(exc).__name__}: {exc}); check the connection") from None
            _backoff(min(8.0, 0.25 * 2 ** failures))


# ----------------------------------------------------------------------------------------------
# Resumable hash state


class StreamState:
    """Where each remote shard's stream was, and its sha256 state there (a line per piece); lets a
    resumed merge skip the bytes already hashed. Not fsync'd: a lost line only means an earlier start."""

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._fh = None
        self.saved: dict[str, list[tuple[int, bytes]]] = {}
        if path is not None and path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    key, pos, state = entry["key"], int(entry["pos"]), bytes.fromhex(entry["state"])
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line
                if len(state) == _CTX_BYTES:
                    self.saved.setdefault(key, []).append((pos, state))

    @staticmethod
    def key(file: RemoteFile) -> str:
        return f"{file.url} {file.sha256}"

    def best(self, file: RemoteFile, before: int) -> tuple[int, bytes | None]:
        """The furthest saved position at or before ``before`` and its state; (0, None) if none."""
        found = [(p, s) for p, s in self.saved.get(self.key(file), []) if p <= before]
        return max(found, key=lambda x: x[0]) if found else (0, None)

    def save(self, file: RemoteFile, pos: int, state: bytes) -> None:
        if self.path is None:
            return
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "a", encoding="utf-8")
            self._fh.write(json.dumps({"key": self.key(file), "pos": pos, "state": state.hex()}) + "\n")
            self._fh.flush()

    def close(self, remove: bool = False) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if remove and self.path is not None:
                self.path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# One remote shard, read as a stream


def _load_fallocate() -> Any:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    return fn


_fallocate = _load_fallocate()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    """Free a range of the spill file (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); dirty pages there
    are dropped before they reach the disk. Where the filesystem cannot, the bytes stay until the
    file is truncated or closed."""
    if _fallocate is not None and length > 0:
        _fallocate(fd, 0x02 | 0x01, offset, length)


class PieceBuffers:
    """Reusable anonymous mappings for pieces: a fresh mapping per piece costs a page fault and a
    zeroed page per 4 KiB (seconds of system time per GB); bytearrays, allocated on the fetch
    threads' malloc arenas and freed on the reader's, stayed resident (~0.3 GB more)."""

    def __init__(self, keep: int = 32):
        self._free: list[mmap.mmap] = []
        self._keep = keep
        self._lock = threading.Lock()

    def take(self, n: int) -> mmap.mmap:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= n:
                    return self._free.pop(i)
        return mmap.mmap(-1, max(n, PIECE_BYTES))

    def give(self, buf: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


@dataclass(frozen=True)
class _Piece:
    """One range request of a shard: bytes [offset, offset + size), asked for at ``asked_at``."""

    offset: int
    size: int
    future: Future
    asked_at: float


@dataclass
class _Region:
    """Bytes [offset, offset + nbytes) that the merge will read ``reads`` times."""

    offset: int
    nbytes: int
    left: int  # bytes still to be read (over all passes)
    spilled: bool = False


class RemoteShard:
    """The whole of one remote file, fetched in order once, hashed, and served to reads of the
    ``regions`` (offset, nbytes, times read) the merge declared. Reads come from one thread."""

    def __init__(self, file: RemoteFile, pool: ThreadPoolExecutor, regions: list[tuple[int, int, int]], *,
                 state: StreamState | None = None, spill_dir: Path | None = None,
                 count: Callable[[int], None] | None = None, piece: int | None = None, window: int | None = None,
                 buffers: PieceBuffers | None = None):
        self.file = file
        self._pool, self._piece, self._window = pool, piece or PIECE_BYTES, window or WINDOW
        self._regions = sorted((_Region(o, n, n * r) for o, n, r in regions if n > 0 and r > 0), key=lambda r: r.offset)
        self._starts = [r.offset for r in self._regions]
        self._reads = {r.offset: r.left // r.nbytes for r in self._regions}
        self._live = len(self._regions)
        self._state, self._spill_dir, self._count = state, spill_dir, count
        self._spill: Any = None
        self._cancelled = threading.Event()
        self._location = Location(file)
        kind = "sha256" if file.sha256 else "git-sha1" if file.git_oid else "none"
        start, saved = 0, None
        if state is not None and kind == "sha256" and can_save_hash_state() and self._regions:
            start, saved = state.best(file, self._regions[0].offset)
        self._hasher = Hasher(kind if kind != "none" else "sha256", file.size, saved)
        self._cursor = start  # the stream is consumed up to here
        self._next = start  # the next byte to ask for
        self._pieces: deque[_Piece] = deque()  # in flight or arrived, in file order
        self._took: deque[float] = deque(maxlen=16)  # seconds the last pieces took
        self._took_lock = threading.Lock()
        self._cur: memoryview | None = None
        self._buffers = buffers or PieceBuffers()
        self._cur_off = start
        self._served = start  # the furthest byte read so far
        self._last_take = time.monotonic()  # when a read last took bytes from the stream
        self._rereading = False  # the last read was a second pass over a region (served from the spill file)
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self.finished = self._live == 0

    # -- the stream -----------------------------------------------------------------------------

    def _fill(self) -> None:
        while len(self._pieces) + (self._cur is not None) < self._window and self._next < self.file.size:
            n = min(self._piece, self.file.size - self._next)
            self._pieces.append(_Piece(self._next, n, self._pool.submit(self._fetch, self._next, n), time.monotonic()))
            self._next += n

    def _fetch(self, offset: int, n: int, stop: threading.Event | None = None) -> memoryview:
        started = time.monotonic()
        buf = memoryview(self._buffers.take(n))[:n]
        fetch_range(self.file, offset, buf, self._location, self._count, _Either(self._cancelled, stop))
        if not (self._cancelled.is_set() or (stop is not None and stop.is_set())):
            with self._took_lock:
                self._took.append(time.monotonic() - started)
        return buf

    def _straggling(self, piece: _Piece) -> bool:
        """``piece`` is a straggler: a later piece has arrived, and it has taken longer than
        ``HEDGE_AFTER_S`` and ``HEDGE_FACTOR`` times the usual piece."""
        with self._took_lock:
            took = sorted(self._took)
        if len(took) < 3 or not any(p.future.done() for p in self._pieces):
            return False
        return time.monotonic() - piece.asked_at > max(HEDGE_AFTER_S, HEDGE_FACTOR * took[len(took) // 2])

    def _arrived(self, piece: _Piece) -> memoryview:
        """Wait for ``piece``; a straggler is asked for again on another connection (one slow
        connection must not set the pace), and the first copy to arrive is taken."""
        copies, stops = [piece.future], [threading.Event()]
        while True:
            done, _ = wait(copies, timeout=0.1, return_when=FIRST_COMPLETED)
            good = [f for f in done if f.exception() is None]
            if good or len(done) == len(copies):
                break
            if self._cancelled.is_set():  # the merge stopped (Ctrl-C): do not wait for the network
                raise SourceError(f"{self.file.where}: interrupted") from None
            if len(copies) == 1 and self._straggling(piece):
                stops.append(threading.Event())
                copies.append(self._pool.submit(self._fetch, piece.offset, piece.size, stops[-1]))
                logger.info("%s: the range from byte %d is slow; asked for again on another connection",
                            self.file.where, piece.offset)
        winner = good[0] if good else copies[0]
        for f, stop in zip(copies, stops):
            if f is not winner:
                stop.set()  # the slower copy gives up; its buffer goes back to the pool once it has
                f.add_done_callback(lambda f: None if f.exception() else self._buffers.give(f.result().obj))
        return winner.result()  # raises the failure when every copy failed

    def _drop_current(self) -> None:
        if self._cur is not None:
            self._buffers.give(self._cur.obj)  # type: ignore[arg-type]
            self._cur = None

    def _view(self) -> memoryview:
        """The stream's bytes from the cursor to the end of the current piece (the next piece once
        this one is used up, hashed as it becomes current)."""
        if self._cur is not None and self._cursor < self._cur_off + len(self._cur):
            return self._cur[self._cursor - self._cur_off:]
        self._drop_current()
        self._fill()
        piece = self._pieces.popleft()
        self._cur, self._cur_off = self._arrived(piece), piece.offset
        self._hasher.update(self._cur)
        end, state = piece.offset + piece.size, self._hasher.state()
        if self._state is not None and state is not None and end < self.file.size:
            self._state.save(self.file, end, state)
        self._fill()
        return self._cur

    def _consume(self, until: int, dest: memoryview | None, keep: Callable[[int, int], bool]) -> None:
        """Consume the stream up to ``until``, into ``dest`` (bytes from the cursor) when given; the
        spans [a, b) for which ``keep(a, b)`` go to the spill file too."""
        done = 0
        while self._cursor < until:
            view = self._view()
            n = min(len(view), until - self._cursor)
            if dest is not None:
                dest[done:done + n] = view[:n]
            self._spill_spans(self._cursor, view[:n], keep)
            self._cursor += n
            done += n

    def _spill_spans(self, pos: int, data: memoryview, keep: Callable[[int, int], bool]) -> None:
        end = pos + len(data)
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        while i < len(self._regions) and self._regions[i].offset < end:
            r = self._regions[i]
            a, b = max(pos, r.offset), min(end, r.offset + r.nbytes)
            if a < b and keep(a, b) and r.left > 0:
                self._write_spill(a, data[a - pos:b - pos])
                r.spilled = True
            i += 1

    def _write_spill(self, pos: int, data: memoryview) -> None:
        if self._spill is None:
            self._spill = tempfile.TemporaryFile(dir=self._spill_dir, prefix="hfms-spill-")
        done = 0
        while done < len(data):
            done += os.pwrite(self._spill.fileno(), data[done:], pos + done)

    def _read_spill(self, pos: int, dest: memoryview) -> None:
        done = 0
        while done < len(dest):
            n = os.preadv(self._spill.fileno(), [dest[done:]], pos + done) if self._spill is not None else 0
            if n <= 0:
                raise CheckpointError(f"{self.file.where}: internal error: bytes {pos + done}.. were not kept for a "
                                      "second read")
            done += n

    # -- reads ----------------------------------------------------------------------------------

    def drain(self) -> bool:
        """While the reads are in a second pass over a big tensor (served from the spill file, the
        stream untouched for ``STALL_S``) and the next piece has arrived, move one piece to the spill
        file so that the connections keep going. A merge that merely lags (its last read took from the
        stream) is left alone: the CPU sets its pace, and spilling would only add work. False if
        nothing was done. Called from the draining thread; never blocks on the network or a read."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if (self.finished or self._cancelled.is_set() or not self._rereading or len(self._pieces) < self._window - 1
                    or time.monotonic() - self._last_take < STALL_S
                    or not self._pieces[0].future.done() or self._cursor - self._served >= SPILL_AHEAD):
                return False
            if self._pieces[0].future.exception() is not None:
                return False  # raised again by the read that needs it
            end = self._pieces[0].offset + self._pieces[0].size
            if self._cur is not None and self._cursor < self._cur_off + len(self._cur):
                end = self._cur_off + len(self._cur)  # the current piece first
            try:
                self._consume(end, None, lambda a, b: True)
            except BaseException as exc:  # a full disk, say: the next read raises it
                self._failed = exc
                return False
            return True
        finally:
            self._lock.release()

    def read(self, pos: int, dest: memoryview) -> None:
        """Bytes [pos, pos + len(dest)) of the file, which lie within one declared region."""
        if len(dest) == 0:
            return
        with self._lock:
            if self._failed is not None:
                raise self._failed
            self._read(pos, dest)
            self._served = max(self._served, pos + len(dest))

    def _read(self, pos: int, dest: memoryview) -> None:
        i = bisect.bisect_right(self._starts, pos) - 1
        region = self._regions[i] if i >= 0 else None
        if region is None or pos + len(dest) > region.offset + region.nbytes or region.left < len(dest):
            raise CheckpointError(f"{self.file.where}: internal error: an undeclared read of bytes {pos}..")
        done = 0
        if pos < self._cursor:
            done = min(len(dest), self._cursor - pos)
            self._read_spill(pos, dest[:done])
        # A later pass (the first pass over the region is complete); not merely bytes drained earlier,
        # whose reads must not keep the drain going.
        self._rereading = region.left <= region.nbytes * (self._reads[region.offset] - 1)
        if done < len(dest):
            self._consume(pos + done, None, lambda a, b: True)  # skipped ahead: keep what is still to be read
            again = self._reads[region.offset] > 1
            self._consume(pos + len(dest), dest[done:], lambda a, b: again)
            self._last_take = time.monotonic()
        region.left -= len(dest)
        if region.left == 0:
            self._live -= 1
            if region.spilled:
                region.spilled = False
                if self._spill is not None and not any(r.spilled for r in self._regions):
                    os.ftruncate(self._spill.fileno(), 0)  # nothing kept is needed any more
                elif self._spill is not None:
                    _punch_hole(self._spill.fileno(), region.offset, region.nbytes)
            if self._live == 0:
                self._finish()

    def _finish(self) -> None:
        """Hash the rest of the file and check it against the Hub's hash."""
        self._consume(self.file.size, None, lambda a, b: False)
        self._drop_current()
        expected = self.file.sha256 or self.file.git_oid
        got = self._hasher.hexdigest()
        self.finished = True
        self._cancelled.set()
        self._close()
        if expected and got != expected:
            what = "LFS sha256" if self.file.sha256 else "git blob id"
            raise CheckpointError(f"{self.file.repo_id}: shard {self.file.filename} does not match the Hub's {what} "
                                  f"(got {got[:16]}..., expected {expected[:16]}...): the download was corrupted; "
                                  "nothing was written")

    def cancel(self) -> None:
        """Make the reading thread and the fetches give up (from any thread)."""
        self._cancelled.set()

    def close(self) -> None:
        self._cancelled.set()
        with self._lock:
            self._close()

    def _close(self) -> None:
        for piece in self._pieces:
            piece.future.cancel()
        self._pieces.clear()
        self._cur = None
        if self._spill is not None:
            self._spill.close()
            self._spill = None


class RemoteShardFiles(ShardFiles):
    """``ShardFiles`` where the shards in ``remote`` (local path standing for the file -> the file)
    are streamed over HTTP; every other path is read from disk as usual. ``regions`` declares what the
    merge will read of each remote file: (offset, nbytes, times read)."""

    def __init__(self, remote: dict[Path, RemoteFile], regions: dict[Path, list[tuple[int, int, int]]], *,
                 state_path: Path | None = None, spill_dir: Path | None = None, progress: bool = False,
                 direct: bool = True, map_cached: bool = False):
        super().__init__(direct=direct, map_cached=map_cached)
        self._remote = remote
        self._regions = regions
        self._shards: dict[Path, RemoteShard] = {}
        self._state = StreamState(state_path)
        self._spill_dir = spill_dir
        active = sum(1 for p in remote if regions.get(p))
        self._pool = ThreadPoolExecutor(max(2, min(32, WINDOW * max(1, active))), thread_name_prefix="hfms-fetch")
        self._fetched = 0
        self._count_lock = threading.Lock()
        self._buffers = PieceBuffers(keep=WINDOW * max(1, active) + 2)
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, name="hfms-drain", daemon=True)
        self._drainer.start()
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(remote[p].size for p in remote if regions.get(p))
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="fetched", position=1, leave=False)

    @property
    def fetched_bytes(self) -> int:
        return self._fetched

    def _count(self, n: int) -> None:
        with self._count_lock:
            self._fetched += n
        if self._bar is not None:
            self._bar.update(n)

    def _drain(self) -> None:
        """Keep the connections busy while the reads pause (``RemoteShard.drain``)."""
        while not self._stop.wait(0.01):
            try:
                while any([s.drain() for s in list(self._shards.values())]):
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a read that needs the failed piece raises it
                pass

    def _shard(self, path: Path) -> RemoteShard:
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = RemoteShard(self._remote[path], self._pool, self._regions.get(path, []),
                                                     state=self._state, spill_dir=self._spill_dir, count=self._count,
                                                     buffers=self._buffers)
        return shard

    def mapped(self, info: TensorInfo, start: int, nbytes: int, align: int) -> np.ndarray | None:
        return None if info.path in self._remote else super().mapped(info, start, nbytes, align)

    def reads_direct(self, path: Path) -> bool:
        return False if path in self._remote else super().reads_direct(path)

    def read_into(self, info: TensorInfo, start: int, dest: memoryview, keep_cached: bool = False) -> None:
        if info.path in self._remote:
            self._shard(info.path).read(info.offset + start, dest)
        else:
            super().read_into(info, start, dest, keep_cached)

    def interrupt(self) -> None:
        """The merge stopped: reads waiting for the network give up, fetches stop (any thread)."""
        self._stop.set()
        for shard in list(self._shards.values()):
            shard.cancel()

    @property
    def complete(self) -> bool:
        """Every remote file the merge reads from has been read, hashed and checked."""
        return all(p in self._shards and self._shards[p].finished for p in self._remote if self._regions.get(p))

    def close(self) -> None:
        self._stop.set()
        self._drainer.join()
        for shard in self._shards.values():
            shard.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._state.close(remove=self.complete)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        super().close()
