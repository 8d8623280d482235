"""HTTP range reads of Hub files, with one retry policy for every read: the small header reads of
pre-flight and the plan as well as the bulk reads of ``--stream``.

Requests go through huggingface_hub's session (its auth headers, ``HF_TOKEN``, ``HF_ENDPOINT``). The
Hub answers a file's URL with a redirect to LFS/Xet storage (a signed URL on another host):
``Location`` asks once per file (``get_hf_file_metadata``), sends the ranges there without the Hub
token, and asks again when storage refuses an expired URL. Requests are retried with exponential
backoff on 408/429/5xx and on dropped or stalled connections; a connection that drops mid-range is
resumed from the last byte received; a body read to its end leaves the connection in the session's
pool. A server that ignores ``Range`` (HTTP 200, the whole file) is read only as far as the range for
``read_range`` (a header, at the start of the file); for the stream's pieces that would be a download
of the file per piece, and it is refused.

>>> data = read_range(file, 0, 8, location_of(file))  # doctest: +SKIP
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from hf_model_stock.errors import NetworkError, SourceError
from hf_model_stock.hub.errors import RETRY_STATUS, first_line, refused, status_of
from hf_model_stock.hub.retry import RETRIES, pause

TIMEOUT_S = 60.0


class Cancelled(Protocol):
    """Anything with ``is_set`` (a ``threading.Event``, ``Either``)."""

    def is_set(self) -> bool: ...


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


class Retry(Exception):
    """A transient failure: the connection dropped, timed out, ended short, or the server said 408/429/5xx."""


class Expired(Exception):
    """Storage refused a signed URL (it expired): ask the Hub for a new one."""


class Either:
    """Set when any of its events is (the merge stopped, or this copy of a piece lost the race)."""

    def __init__(self, *events: Cancelled | None):
        self._events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self._events)


def _transient() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError, OSError, Retry)


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
            status = status_of(exc)
            if status in (401, 403):
                raise refused(self.file.repo_id, status, self.file.filename) from None
            if status == 404:
                raise SourceError(f"{self.file.where}: not found on the Hub (HTTP 404)") from None
            if status is not None and status not in RETRY_STATUS:
                raise SourceError(f"{self.file.where}: the Hub answered HTTP {status} ({first_line(exc)})") from None
            raise Retry(f"HTTP {status} asking the Hub where {self.file.filename} is") from None
        headers = build_hf_headers()
        if _origin(meta.location) != _origin(self.file.url):
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        return meta.location, headers


_locations: dict[RemoteFile, Location] = {}
_locations_lock = threading.Lock()


def location_of(file: RemoteFile) -> Location:
    """The one ``Location`` of ``file`` in this process: its header reads and its stream share it, so
    the Hub is asked where the file lives once."""
    with _locations_lock:
        found = _locations.get(file)
        if found is None:
            found = _locations[file] = Location(file)
        return found


@contextmanager
def _range_response(file: RemoteFile, start: int, end: int, where: Location,
                    whole_ok: bool) -> Iterator[tuple[Any, bool]]:
    """GET bytes [start, end] of ``file`` from ``where``: the open response, and whether its body is the
    whole file (a server that ignored ``Range``, accepted only with ``whole_ok``) rather than the range."""
    from huggingface_hub.utils import get_session

    url, headers, generation = where.get()
    headers = {**headers, "Range": f"bytes={start}-{end}", "Accept-Encoding": "identity"}
    with get_session().stream("GET", url, headers=headers, timeout=TIMEOUT_S) as response:
        status = response.status_code
        if status in RETRY_STATUS:
            raise Retry(f"HTTP {status}")
        if status in (401, 403, 410) and _origin(url) != _origin(file.url):
            where.expire(generation)
            raise Expired(f"HTTP {status} from storage")
        if status in (401, 403):
            raise refused(file.repo_id, status, file.filename)
        if status == 404:
            raise SourceError(f"{file.where}: not found on the Hub (HTTP 404)")
        if status == 200:
            if whole_ok:
                yield response, True
                return
            raise SourceError(
                f"{file.where}: the server ignored the Range header (HTTP 200 to a request for bytes {start}-{end}): "
                "--stream needs range requests; run without --stream to download the model instead")
        if status != 206:
            raise SourceError(f"{file.where}: HTTP {status} to a range request for bytes {start}-{end}")
        got = response.headers.get("Content-Range", "")
        if not got.startswith(f"bytes {start}-{end}/"):
            raise SourceError(f"{file.where}: asked for bytes {start}-{end}, the server sent {got or 'no Content-Range'}")
        yield response, False


def fetch_range(file: RemoteFile, start: int, dest: memoryview, where: Location,
                count: Callable[[int], None] | None = None, cancelled: Cancelled | None = None,
                whole_ok: bool = False) -> None:
    """Fill ``dest`` with the bytes of ``file`` from ``start``, fetched at ``where``; a connection that
    drops or stalls is resumed from the last byte received, ``RETRIES`` times with backoff; an expired
    storage URL is asked for again, ``RETRIES`` times; ``NetworkError`` after that. ``whole_ok``: a
    server that answers with the whole file is read up to the range's end (else refused)."""
    got, failures, expired = 0, 0, 0
    transient = _transient()
    while got < len(dest):
        if cancelled is not None and cancelled.is_set():
            return
        try:
            with _range_response(file, start + got, start + len(dest) - 1, where, whole_ok) as (response, whole):
                skip = start + got if whole else 0
                for chunk in response.iter_raw():  # to the end of the body: the connection goes back to the pool
                    if cancelled is not None and cancelled.is_set():
                        return  # the merge stopped: nobody reads this piece
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    n = min(len(chunk), len(dest) - got)
                    dest[got:got + n] = chunk[:n]
                    got += n
                    if count is not None:
                        count(n)
                    if whole and got == len(dest):
                        break  # the rest of the whole file is not wanted
            if got < len(dest):
                raise Retry(f"the response ended after {got} of {len(dest)} bytes")
        except Expired as exc:
            expired += 1
            if expired > RETRIES:
                raise NetworkError(f"{file.where}: storage refused the Hub's download URL {expired} times ({exc})") from None
        except transient as exc:
            failures += 1
            if failures > RETRIES:
                raise NetworkError(f"{file.where}: download failed {failures} times at byte {start + got} "
                                   f"({type(exc).__name__}: {first_line(exc)}); check the connection") from None
            pause(failures)


def read_range(file: RemoteFile, start: int, length: int, where: Location | None = None) -> bytes:
    """Bytes [start, start + length) of ``file``, with ``fetch_range``'s retries; meant for small reads
    near the start of a file (a header), so a server that ignores ``Range`` is read that far."""
    buf = bytearray(length)
    fetch_range(file, start, memoryview(buf), where or location_of(file), whole_ok=True)
    return bytes(buf)
