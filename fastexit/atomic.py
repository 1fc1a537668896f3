"""Files that survive crashes and concurrent processes: atomic writes, standard JSON, file
digests, stale temporary files and file locks.

- ``atomic_write``: a crash or an interrupt mid-write leaves the previous file intact; a full
  disk is one ``OSError`` "no space left on <folder>", the partial file removed.
- ``json_text`` / ``write_json``: standard JSON only (a non-finite float is written as null).
- ``file_digest``: the SHA-256 of a file's bytes, the check every file we read back gets.
- ``remove_stale_temps``: what crashed writers of ours left in a folder (by name pattern).
- ``try_lock`` / ``locked``: ``fcntl.flock`` locks, which the OS releases when their process
  dies (kill -9 included): no stale lock is ever left behind.

A leaf module (standard library only), so that the data cache, run files and checkpoints
share these without importing each other.
"""
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# Below this much free space after a failed write, the write failed for want of space: numpy's
# tofile ("91171 requested and 83968 written") and torch.save (a RuntimeError) give no errno.
LOW_SPACE_BYTES = 16 << 20
DIGEST_CHUNK = 1 << 20
HOLDER_WAIT_S = 2.0  # how long a refused process waits for the lock holder to write its PID
TEMP_SUFFIX = ".tmp"
_OUR_TEMP = re.compile(r"^\..+\.\d+\.tmp$")  # .<name>.<pid>.tmp, as temp_path names them


# ---------------------------------------------------------------------------- writes
def temp_path(path: Path) -> Path:
    """Where ``path`` is written before its rename: ``.<name>.<pid>.tmp`` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def no_space(folder: Path, err: BaseException) -> Optional[OSError]:
    """An ``OSError`` "no space left on <folder>" when ``err`` (from a write into ``folder``)
    came from a full disk or quota, else None. Call it before removing the partial file."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        full = True
    elif isinstance(err, (OSError, RuntimeError)):
        try:
            full = shutil.disk_usage(folder).free < LOW_SPACE_BYTES
        except OSError:
            full = False
    else:
        full = False
    if not full:
        return None
    out = OSError(f"no space left on {folder}")
    out.errno = errno.ENOSPC
    return out


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:  # noqa: BLE001 - torch.save reports a full disk as a RuntimeError
        full = no_space(path.parent, err)
        if full is not None:
            tmp.unlink(missing_ok=True)
            raise full from None
        raise
    finally:
        tmp.unlink(missing_ok=True)  # only left over when `write` failed


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) replaced by None: what JSON can hold."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj: Any, **kwargs) -> str:
    """Standard JSON (never the bare ``NaN`` / ``Infinity`` Python writes): non-finite floats
    become null."""
    return json.dumps(finite_json(obj), allow_nan=False, **kwargs)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented standard JSON at ``path``, atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(json_text(obj, indent=2) + "\n", encoding="utf-8"))


def write_lines(path: Path, lines) -> None:
    """Text lines at ``path`` (each ending in a newline), atomically."""
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8"))


# --------------------------------------------------------------------------- digests
def file_digest(path: Path) -> str:
    """SHA-256 (hex) of the bytes of ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(DIGEST_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------- crash leftovers
def remove_stale_temps(folder: Path, pattern: Optional["re.Pattern"] = None) -> list:
    """Remove what crashed writers of ours left in ``folder``: the files and folders whose
    names ``pattern`` matches (default: ``.<name>.<pid>.tmp``, as ``temp_path`` names them).
    Call it only while holding the lock of everything that writes such names there (no live
    writer of ours is mid-write). Returns the names removed."""
    pattern = pattern or _OUR_TEMP
    removed = []
    for entry in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if not pattern.match(entry.name):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError:  # not ours to remove after all (permissions): it stays, harmless
            continue
        removed.append(entry.name)
    return removed


# ------------------------------------------------------------------------------ locks
def _open_lock(file: Path) -> Optional[int]:
    """fd of the lock file (created when missing); read-only where the folder is not ours to
    write (a flock needs no write access); None when it neither exists nor can be made."""
    try:
        return os.open(file, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        pass
    except OSError as err:
        if err.errno != errno.EROFS:
            raise
    try:
        return os.open(file, os.O_RDONLY)
    except FileNotFoundError:
        return None


def try_lock(file: Path, *, shared: bool = False, blocking: bool = False) -> Optional[int]:
    """An open fd of ``file`` holding its flock (exclusive, or ``shared``), or None when
    another process holds a conflicting one and ``blocking`` is False. The lock lasts until the
    fd is closed or the process dies. A lock file that was unlinked while we waited (its owner
    gave up the folder) is not a lock: we then lock the file now at that path."""
    file = Path(file)
    while True:
        fd = _open_lock(file)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(file)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def locked(file: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold ``file``'s flock (waiting for it) for the duration of the block. Without a lock
    file and no right to create one (a read-only folder), the block runs unlocked: nothing of
    ours can be writing there."""
    fd = try_lock(file, shared=shared, blocking=True)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)


def write_holder(fd: int) -> None:
    """Write this process's PID and host into the lock file ``fd`` holds (for the error a
    second process gets)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {os.uname().nodename}\n".encode(), 0)


def read_holder(file: Path, wait: float = HOLDER_WAIT_S) -> str:
    """"process <pid> on <host>" from a lock file ``write_holder`` wrote; a plain phrase when
    the holder has not written it within ``wait`` seconds (it writes right after it locks: a
    process that lost the race by microseconds still names the winner)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            pid, _, host = Path(file).read_text(encoding="utf-8").strip().partition(" ")
        except OSError:
            pid = ""
        if pid.isdigit() or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    return f"process {pid} on {host}" if pid.isdigit() else "another process (which has not written its PID yet)"
