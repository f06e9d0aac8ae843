"""Download one dataset file from a list of mirrors, verified by SHA-256 and written atomically.

`download_file(urls, dest, sha256, ...)` returns at once when `dest` already holds the verified
file. Otherwise it tries each mirror in order, retrying transient failures with exponential
backoff, and moves the file into place only once its checksum matches: a failed download leaves no
file behind.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

from opsloop.atomic import sha256_file
from opsloop.errors import DownloadError

log = logging.getLogger(__name__)

_CHUNK_BYTES = 1 << 20
# Some mirrors refuse urllib's default agent ("Python-urllib/3.x") with 403.
_USER_AGENT = "opsloop-downloader/1.0"


class _RetryableError(Exception):
    """A transient failure (connection, timeout, 5xx, 429, short body): try the same URL again."""


class _MirrorFailedError(Exception):
    """This mirror cannot serve the file (4xx, or retries spent): go on to the next mirror."""


def download_file(
    urls: Sequence[str],
    dest: Path,
    sha256: str,
    *,
    retries: int,
    backoff_seconds: float,
    timeout_seconds: float,
) -> Path:
    """Fetch `dest` from the first mirror in `urls` that serves it with the expected SHA-256.

    `retries` is the number of attempts per mirror (at least one is always made); the wait between
    attempts doubles from `backoff_seconds`. Raises `DownloadError` when no mirror delivers the file
    or when a delivered file fails its checksum.
    """
    expected = sha256.strip().lower()
    if dest.is_file() and sha256_file(dest) == expected:
        log.debug("cache hit: %s", dest)
        return dest
    if not urls:
        raise DownloadError(f"no mirror URL to download {dest.name} from; set data.mirrors")
    dest.parent.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for url in urls:
        try:
            _fetch_with_retries(
                url, dest, expected, max(1, retries), backoff_seconds, timeout_seconds
            )
        except _MirrorFailedError as exc:
            last_error = f"{url}: {exc}"
            log.warning("download failed from %s (%s); trying the next mirror", url, exc)
            continue
        return dest
    raise DownloadError(
        f"could not download {dest.name} from {', '.join(urls)} (last error: {last_error}); "
        f"check the network and data.mirrors, or place the file at {dest} yourself"
    )


def _fetch_with_retries(
    url: str, dest: Path, expected: str, attempts: int, backoff_seconds: float, timeout: float
) -> None:
    """Try one URL up to `attempts` times, sleeping backoff, 2x backoff, ... between tries."""
    for attempt in range(1, attempts + 1):
        try:
            _fetch_once(url, dest, expected, timeout)
        except _RetryableError as exc:
            if attempt == attempts:
                raise _MirrorFailedError(f"{exc} (after {attempts} attempts)") from exc
            delay = backoff_seconds * 2 ** (attempt - 1)
            log.warning(
                "download of %s failed (%s); retry %d of %d in %.2fs",
                url,
                exc,
                attempt,
                attempts - 1,
                delay,
            )
            time.sleep(delay)
            continue
        return


def _fetch_once(url: str, dest: Path, expected: str, timeout: float) -> None:
    """One attempt: stream into a temp file beside `dest`, verify, then rename it into place."""
    # The temp file shares dest's directory so that os.replace is an atomic same-filesystem rename.
    fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(name)
    try:
        actual = _stream_to_file(url, tmp, timeout)
        if actual != expected:
            # Not retried: a wrong checksum is not transient, and a silent fallback would hide it.
            raise DownloadError(
                f"{url} has sha256 {actual} but {expected} was expected; the file is corrupt "
                "or changed upstream: check data.mirrors or the file's sha256 in the data config"
            )
        tmp.replace(dest)  # os.replace: atomic, so readers see the old file or the whole new one
    finally:
        tmp.unlink(missing_ok=True)


def _stream_to_file(url: str, tmp: Path, timeout: float) -> str:
    """Copy the body of `url` into `tmp`, returning its SHA-256; map failures to retry or skip."""
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, tmp.open("wb") as out:
            declared = _content_length(response)
            received, digest = _copy_body(response, out)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code >= 500 or exc.code == 429:
            raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
        raise _MirrorFailedError(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as exc:
        raise _RetryableError(_describe(exc)) from exc
    except ValueError as exc:  # urllib's answer to a malformed URL; retrying cannot fix it
        raise _MirrorFailedError(str(exc)) from exc
    if declared is not None and received != declared:
        raise _RetryableError(f"truncated body: got {received} of {declared} bytes")
    return digest


def _copy_body(response: Any, out: BinaryIO) -> tuple[int, str]:
    """Stream the response into `out` chunk by chunk; return the byte count and SHA-256."""
    digest = hashlib.sha256()
    received = 0
    while chunk := response.read(_CHUNK_BYTES):
        digest.update(chunk)
        out.write(chunk)
        received += len(chunk)
    return received, digest.hexdigest()


def _content_length(response: Any) -> int | None:
    """The Content-Length the server promised, or None when absent or unparsable."""
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(exc: BaseException) -> str:
    """A short one-line description of a network error (URLError hides its cause in `reason`)."""
    reason = getattr(exc, "reason", None)
    detail = reason if reason is not None else exc
    text = str(detail) or type(detail).__name__
    return " ".join(text.split())
