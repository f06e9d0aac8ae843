"""Atomic writes of whole directories and single files.

Artifacts that matter (datasets, model bundles) are written into a sibling staging directory and
swapped in with renames, so a crash mid-write leaves the previous good version in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces `target`, on error it vanishes.

    The staging directory is a sibling of `target`, so the final rename stays on one filesystem.
    Raises `OSError` (for the caller to turn into its own error) when the parent is unwritable.
    """
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=parent))
    staging.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    retired = parent / f".{target.name}.retired-{os.getpid()}"
    try:
        yield staging
        if target.exists():
            target.rename(retired)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired.exists() and not target.exists():
            retired.rename(target)  # put the previous good version back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Have `write` fill a temp file beside `path`, then rename it over `path`.

    Readers never see half a file, and a failed write leaves the old file (or none).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temp))
        Path(temp).chmod(0o644)  # mkstemp's 0600 would hide the file from other users
        Path(temp).replace(path)
    finally:
        Path(temp).unlink(missing_ok=True)
    return path


def write_text_atomically(path: Path, text: str) -> None:
    """Write a text file via a temp file and a rename."""
    replace_atomically(path, lambda temp: temp.write_text(text))


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
