"""One retry policy for every Hub request: 408, 429 and 5xx answers, and connections that drop, time
out or end short, are tried again ``RETRIES`` times with exponential backoff; anything else (401/403,
404, a malformed answer, a full disk) fails at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from hf_model_stock.hub.errors import RETRY_STATUS, status_of

RETRIES = 5
_backoff = time.sleep  # between tries (tests make it instant)
T = TypeVar("T")


def pause(failures: int) -> None:
    """Wait before the next try, after ``failures`` failed ones (0.5 s, 1 s, 2 s, ... at most 8 s)."""
    _backoff(min(8.0, 0.25 * 2 ** failures))


def is_transient(exc: BaseException) -> bool:
    """Whether a huggingface_hub call's failure is worth another try: a retryable HTTP status, a broken
    connection, or (online) the "cannot reach the Hub" that huggingface_hub raises after a failed
    request when it found nothing in the cache."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    if isinstance(exc, LocalEntryNotFoundError):
        return not constants.is_offline_mode()
    status = status_of(exc)
    if status is not None:
        return status in RETRY_STATUS
    return isinstance(exc, httpx2.TransportError)


def retrying(call: Callable[[], T], *, head_retried: bool = False) -> T:
    """``call()``, tried again on transient failures (``is_transient``); the last failure is raised.
    ``head_retried``: ``call`` is a huggingface_hub download, which already retries its metadata
    request (HEAD) with its own backoff, so a HEAD that failed after those tries is final here
    (no tries multiplied: an unreachable Hub fails in its ~25 s, not six times that)."""
    failures = 0
    while True:
        try:
            return call()
        except Exception as exc:
            failures += 1
            if failures > RETRIES or not is_transient(exc) or (head_retried and _failed_method(exc) == "HEAD"):
                raise
            pause(failures)


def _failed_method(exc: BaseException) -> str | None:
    """The HTTP method of the request behind ``exc`` or the errors it was raised from, if known."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        for holder in (getattr(error, "response", None), error):
            try:
                method = getattr(getattr(holder, "request", None), "method", None)
            except RuntimeError:  # httpx: an error raised without a request
                method = None
            if isinstance(method, str):
                return method.upper()
        error = error.__cause__ or error.__context__
    return None
