"""Hub failures as one-line errors: the repo named, ``HF_TOKEN`` named where a token is at fault, no
signed storage URL in any message, and advice to run again only where that can help.

>>> scrub_urls("Server error '503' for url 'https://cdn.example/x/abc?exp=1&sig=s3cret'")
"Server error '503' for url 'https://cdn.example/x/abc'"
"""

from __future__ import annotations

import os
import re

from hf_model_stock.errors import SourceError

_URL = re.compile(r"(https?://[^\s'\"<>?#]+)[?#][^\s'\"<>]*")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)


def scrub_urls(text: str) -> str:
    """``text`` with the query and fragment of every URL removed (signed URLs carry their signature there)."""
    return _URL.sub(r"\1", text)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, URLs scrubbed; its class name when it has none."""
    lines = str(exc).strip().splitlines()
    return scrub_urls(lines[0]) if lines else type(exc).__name__


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (huggingface_hub's and httpx's errors keep the response)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a Hub call raises when the network or server fails (httpx2 errors are not OSErrors)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        import httpx2

        errors.append(httpx2.HTTPError)
    except ImportError:  # older huggingface_hub versions use requests, whose errors are OSErrors
        pass
    return tuple(errors)


def _token_in_use() -> str | None:
    """Where the token sent to the Hub comes from: ``HF_TOKEN``, a login, or None."""
    if os.environ.get("HF_TOKEN"):
        return "HF_TOKEN"
    try:
        from huggingface_hub import get_token

        return "the token saved by `hf auth login`" if get_token() else None
    except Exception:  # noqa: BLE001 - only for the wording of a message
        return None


def refused_message(repo_id: str, status: int, what: str | None = None, *, write: bool = False) -> str:
    """The line for a 401/403 on ``repo_id`` (``what``: the file asked for; ``write``: a push): which
    token was refused, or that none was sent, and what to do."""
    token = _token_in_use()
    http = f"HTTP {status}" + (f", {what}" if what else "")
    can = "write to this namespace" if write else "read this repository"
    if token == "HF_TOKEN":
        return f"{repo_id}: the Hub refused the token in HF_TOKEN ({http}): set it to a token that can {can}"
    if token:
        return (f"{repo_id}: the Hub refused {token} ({http}): log in again, or set HF_TOKEN, with a token that can "
                f"{can}")
    return (f"{repo_id}: the Hub refused access ({http}) and no token was sent: set HF_TOKEN (or run "
            f"`hf auth login`) to a token that can {can}")


def refused(repo_id: str, status: int, what: str | None = None) -> SourceError:
    """``refused_message`` as a ``SourceError``."""
    return SourceError(refused_message(repo_id, status, what))


def hub_error_message(label: str, repo_id: str, revision: str | None, exc: BaseException, *,
                      download: bool = False) -> str:
    """A one-line message for an exception raised by a huggingface_hub call about ``repo_id``.

    ``download``: the call was a download that a second run resumes (huggingface_hub keeps the
    partial file), so a transient failure says so; otherwise it says to try again.
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    status = status_of(exc)
    if isinstance(exc, GatedRepoError):
        return f"{label}: gated repository: accept its terms on the Hub, then set HF_TOKEN (or run `hf auth login`)"
    if isinstance(exc, RepositoryNotFoundError):
        if status in (401, 403) and _token_in_use() == "HF_TOKEN":
            return refused_message(label, status)
        return (f"{label}: repository not found on the Hub (or it is private: log in with `hf auth login`, or "
                "set HF_TOKEN, with a token that can read it)")
    if isinstance(exc, RevisionNotFoundError):
        return f"{label}: revision {revision or 'main'!r} not found in {repo_id}"
    if isinstance(exc, IncompleteSnapshotError):
        return (f"{label}: the cached snapshot is incomplete (an interrupted download?) and the Hub cannot be "
                "reached: reconnect (unset HF_HUB_OFFLINE) to finish the download")
    if isinstance(exc, LocalEntryNotFoundError):  # a subclass of EntryNotFoundError: first
        from huggingface_hub import constants

        cause = exc.__cause__ or exc.__context__
        if constants.is_offline_mode() or cause is None:
            return f"{label}: not in the local cache and the Hub is offline (HF_HUB_OFFLINE)"
        # online: huggingface_hub tried the Hub (with its own retries) and fell back to an empty cache
        return hub_error_message(label, repo_id, revision, cause, download=download)
    if isinstance(exc, EntryNotFoundError):
        return f"{label}: {first_line(exc)}"
    if status in (401, 403):
        return refused_message(label, status)
    if status == 404:
        return f"{label}: not found on the Hub (HTTP 404)"
    if status is not None and status not in RETRY_STATUS:
        return f"{label}: the Hub answered HTTP {status} ({first_line(exc)})"
    if status is not None:  # retryable, and retried
        return f"{label}: the Hub kept answering HTTP {status} after retries; try again later"
    if download:
        return f"{label}: download failed ({type(exc).__name__}: {first_line(exc)}); run again to resume"
    return f"{label}: the Hub could not be reached ({type(exc).__name__}: {first_line(exc)}); check the connection"
