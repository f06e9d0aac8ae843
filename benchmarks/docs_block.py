"""Write a benchmark's results into the docs, between its markers.

Each benchmark owns one block of a docs page, delimited by `<!-- benchmark:NAME:start -->` and
`<!-- benchmark:NAME:end -->`; `fill_block` replaces what lies between them (and fails, naming
the page, if the markers are missing, rather than appending somewhere unexpected).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name}:start -->", f"<!-- benchmark:{name}:end -->"


def fill_block(page: Path, name: str, text: str) -> None:
    """Put `text` between the `name` markers of `page`."""
    start, end = markers(name)
    document = page.read_text(encoding="utf-8")
    if start not in document or end not in document.split(start, 1)[1]:
        raise SystemExit(f"{page} has no {start} ... {end} block to fill")
    before, rest = document.split(start, 1)
    after = rest.split(end, 1)[1]
    page.write_text(f"{before}{start}\n{text}\n{end}{after}", encoding="utf-8")


def publish(
    result: dict[str, Any], results: Path, text: str, page: Path, name: str, *, write_docs: bool
) -> None:
    """Save `result` as JSON at `results`, print `text`, and with `write_docs` fill the block."""
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    if write_docs:
        fill_block(page, name, text)
