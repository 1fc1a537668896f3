"""Atomic file writes: a crash or an interrupt mid-write leaves the previous file intact.

A leaf module (standard library only), so that the data cache, run files and checkpoints
share one write path without importing each other.
"""
import json
import os
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left over when `write` failed


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


def write_lines(path: Path, lines) -> None:
    """Text lines at ``path`` (each ending in a newline), atomically."""
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8"))
