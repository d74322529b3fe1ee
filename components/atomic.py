"""Atomic file writes: write under a temporary name in the destination's folder, then
`os.replace`, so a reader (or a stage restarted after a kill) sees the old file or the new one,
never a partial one. A failed write leaves no temporary file behind."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_with(path: Path, writer: Callable[[Path], object]) -> Path:
    """Call `writer(tmp)` to produce the file, then move it onto `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> Path:
    return write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, payload: Any, sort_keys: bool = False) -> Path:
    """Pretty JSON with a trailing newline."""
    return write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")
