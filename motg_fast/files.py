"""Atomic file writes: a kill never leaves half a file (write a temporary, then rename)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder (created if
    needed) and one `os.replace`; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """`data` as indented JSON, written atomically (`write_text_atomic`)."""
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")
