"""Generated sections of the docs, kept true by tests.

A doc file marks a section with `<!-- BEGIN GENERATED: name -->` ... `<!-- END GENERATED: name -->`.
A test renders the section from the code or test table it documents and compares; on a mismatch
it fails with the expected text, and `VMEANBA_UPDATE_DOCS=1 python -m pytest <that test>` writes
the section into the file instead.
"""

from __future__ import annotations

import os
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def check_generated_section(path: Path, name: str, body: str) -> None:
    """Assert the section `name` of `path` is exactly `body` (or rewrite it, see module doc)."""
    begin, end = f"<!-- BEGIN GENERATED: {name} -->", f"<!-- END GENERATED: {name} -->"
    text = path.read_text(encoding="utf-8")
    if text.count(begin) != 1 or text.count(end) != 1:
        raise AssertionError(f"{path} must contain the markers {begin} and {end} once each")
    head, rest = text.split(begin)
    current, tail = rest.split(end)
    wanted = f"\n{body.strip()}\n"
    if current == wanted:
        return
    if os.environ.get("VMEANBA_UPDATE_DOCS") == "1":
        path.write_text(head + begin + wanted + end + tail, encoding="utf-8")
        return
    raise AssertionError(
        f"{path.name}, section {name!r}, is out of date; regenerate it with VMEANBA_UPDATE_DOCS=1 "
        f"python -m pytest <this test>. Expected:\n{wanted}"
    )
