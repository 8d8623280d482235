"""One remote safetensors shard read as a stream: fetched whole, in order, once, hashed as it arrives,
and served to the merge's reads.

A merge reads each input byte once, in file order (the plan sorts tensors by base shard and offset),
so ``RemoteShard`` fetches the whole file in ``PIECE_BYTES`` ranges, ``WINDOW`` of them at a time on a
shared thread pool (several connections, so that one slow connection does not set the pace),
consumes them in order and feeds every byte (header and gaps included) to a sha256 that is checked
against the Hub's LFS oid once the file ends. Bytes that will be read again (the first pass over a
tensor merged in two passes), bytes skipped ahead of the reads (a fine-tune laid out in another
order) and pieces that arrive while a second pass reads the spill (``RemoteShard.drain``: the
connections should not idle meanwhile) are kept in the shard's ``SpillFile``; no other byte touches
the disk. A merge that merely lags behind the network (the CPU sets the pace) leaves the pieces in
memory: spilling them would only add work. A piece the reads wait for that lags far behind the others
(a straggling connection, while later pieces have arrived) is asked for again on another connection,
and the first copy to arrive is taken.
"""

from __future__ import annotations

import bisect
import logging
import mmap
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from hf_model_stock.errors import CheckpointError, SourceError
from hf_model_stock.hub.ranges import Either, RemoteFile, fetch_range, location_of
from hf_model_stock.hub.spill import SpillFile
from hf_model_stock.hub.stream_state import StreamState
from hf_model_stock.io.hashing import Hasher, can_save_hash_state

logger = logging.getLogger(__name__)

PIECE_BYTES = 8 << 20  # bytes per range request
WINDOW = 4  # pieces per shard in flight or waiting to be consumed: memory is WINDOW * PIECE_BYTES per shard
SPILL_AHEAD = 64 << 20  # bytes per shard that may be fetched ahead of the reads into the spill file
STALL_S = 0.25  # a second pass that has not taken a byte of the stream for this long: drain
HEDGE_AFTER_S = 2.0  # a piece the reads wait for, slower than this and than HEDGE_FACTOR x the usual piece,
HEDGE_FACTOR = 4.0  # while a later piece has arrived, is asked for again on another connection


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


class PieceWindow:
    """The ranges of one file asked for in order, ``window`` at a time (held pieces included), on a
    shared pool of fetch threads; ``take`` waits for the next one, asking a straggler again on another
    connection (one slow connection must not set the pace) and taking the first copy to arrive."""

    def __init__(self, file: RemoteFile, pool: ThreadPoolExecutor, start: int, *, piece: int, window: int,
                 buffers: PieceBuffers, cancelled: threading.Event, count: Callable[[int], None] | None = None):
        self.file, self.window = file, window
        self._pool, self._piece, self._buffers, self._cancelled, self._count = pool, piece, buffers, cancelled, count
        self._location = location_of(file)
        self._next = start  # the next byte to ask for
        self._pieces: deque[_Piece] = deque()  # in flight or arrived, in file order
        self._took: deque[float] = deque(maxlen=16)  # seconds the last pieces took
        self._took_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._pieces)

    def head(self) -> _Piece | None:
        """The next piece ``take`` returns, if one was asked for."""
        return self._pieces[0] if self._pieces else None

    def fill(self, held: int = 0) -> None:
        """Ask for pieces until ``window`` are queued or held (``held``: pieces the reader still holds)."""
        while len(self._pieces) + held < self.window and self._next < self.file.size:
            n = min(self._piece, self.file.size - self._next)
            self._pieces.append(_Piece(self._next, n, self._pool.submit(self._fetch, self._next, n), time.monotonic()))
            self._next += n

    def take(self) -> tuple[int, memoryview]:
        """The next piece (its offset and bytes), once it has arrived; raises its failure."""
        piece = self._pieces.popleft()
        return piece.offset, self._arrived(piece)

    def give(self, buf: memoryview) -> None:
        """A piece's buffer, no longer read, back to the pool."""
        self._buffers.give(buf.obj)  # type: ignore[arg-type]

    def close(self) -> None:
        for piece in self._pieces:
            piece.future.cancel()
        self._pieces.clear()

    def _fetch(self, offset: int, n: int, stop: threading.Event | None = None) -> memoryview:
        started = time.monotonic()
        buf = memoryview(self._buffers.take(n))[:n]
        fetch_range(self.file, offset, buf, self._location, self._count, Either(self._cancelled, stop))
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
        self._regions = sorted((_Region(o, n, n * r) for o, n, r in regions if n > 0 and r > 0), key=lambda r: r.offset)
        self._starts = [r.offset for r in self._regions]
        self._reads = {r.offset: r.left // r.nbytes for r in self._regions}
        self._live = len(self._regions)
        self._state = state
        self._spill = SpillFile(file.where, spill_dir)
        self._cancelled = threading.Event()
        kind = "sha256" if file.sha256 else "git-sha1" if file.git_oid else "none"
        start, saved = 0, None
        if state is not None and kind == "sha256" and can_save_hash_state() and self._regions:
            start, saved = state.best(file, self._regions[0].offset)
        self._hasher = Hasher(kind if kind != "none" else "sha256", file.size, saved)
        self._cursor = start  # the stream is consumed up to here
        self._pieces = PieceWindow(file, pool, start, piece=piece or PIECE_BYTES, window=window or WINDOW,
                                   buffers=buffers or PieceBuffers(), cancelled=self._cancelled, count=count)
        self._cur: memoryview | None = None  # the piece being consumed, from offset _cur_off
        self._cur_off = start
        self._served = start  # the furthest byte read so far
        self._last_take = time.monotonic()  # when a read last took bytes from the stream
        self._rereading = False  # the last read was a second pass over a region (served from the spill file)
        self._failed: BaseException | None = None
        self._lock = threading.Lock()
        self.finished = self._live == 0

    # -- the stream -----------------------------------------------------------------------------

    def _drop_current(self) -> None:
        if self._cur is not None:
            self._pieces.give(self._cur)
            self._cur = None

    def _view(self) -> memoryview:
        """The stream's bytes from the cursor to the end of the current piece (the next piece once
        this one is used up, hashed as it becomes current)."""
        if self._cur is not None and self._cursor < self._cur_off + len(self._cur):
            return self._cur[self._cursor - self._cur_off:]
        self._drop_current()
        self._pieces.fill()
        self._cur_off, self._cur = self._pieces.take()
        self._hasher.update(self._cur)
        end, state = self._cur_off + len(self._cur), self._hasher.state()
        if self._state is not None and state is not None and end < self.file.size:
            self._state.save(self.file, end, state)
        self._pieces.fill(held=1)
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
        self._spill.write(pos, data)

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
            head = self._pieces.head()
            if (self.finished or self._cancelled.is_set() or not self._rereading or head is None
                    or len(self._pieces) < self._pieces.window - 1 or time.monotonic() - self._last_take < STALL_S
                    or not head.future.done() or self._cursor - self._served >= SPILL_AHEAD):
                return False
            if head.future.exception() is not None:
                return False  # raised again by the read that needs it
            end = head.offset + head.size
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
            self._spill.read(pos, dest[:done])
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
                if not any(r.spilled for r in self._regions):
                    self._spill.clear()
                else:
                    self._spill.free(region.offset, region.nbytes)
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
        self._pieces.close()
        self._cur = None
        self._spill.close()

