"""A full disk, said plainly: what was being written, where, how much room is left, roughly how much the write
needed, and the fix.

Each writer reports a full disk its own way: Python an OSError with errno ENOSPC (EDQUOT for a quota), safetensors'
Rust writer a SafetensorError ("Error while serializing: I/O error: No space left on device (os error 28)"), and
torch's zip writer a RuntimeError that drops the errno: a short write, "[enforce fail at inline_container.cc:672] .
unexpected pos 704 vs 598" (torch 2.13, measured on a full tmpfs) or "PytorchStreamWriter failed writing file
data/0: file write failed" (earlier versions).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from .config import ConfigError

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_WORDS = ("no space left on device", "disk quota exceeded", *(f"(os error {code})" for code in FULL_ERRNOS))


class DiskFullError(ConfigError, OSError):
    """No room left where cogft writes. The user's to fix (free space or write elsewhere), so the CLI reports it
    like a ConfigError, without a traceback; also an OSError with errno ENOSPC, as code that catches OSError expects
    (as `io.UnsupportedOperation` is both an OSError and a ValueError)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full, in any writer's words above."""
    if isinstance(error, OSError) and error.errno in FULL_ERRNOS:
        return True
    text = str(error).lower()
    if isinstance(error, (OSError, RuntimeError, SafetensorError)) and any(words in text for words in _FULL_WORDS):
        return True
    return isinstance(error, RuntimeError) and ("pytorchstreamwriter failed writing" in text
                                                or ("inline_container" in text and "unexpected pos " in text))


def free_bytes(path: Path) -> int:
    """Free space on the disk that holds `path`, or would hold it (its nearest existing folder)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def folder_bytes(folder: Path) -> int:
    """The size of every file under `folder`."""
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def human_bytes(count: float) -> str:
    """Sizes as `df -h` counts them: 1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def disk_full_error(what: str, folder: Path, needed: int, advice: str) -> DiskFullError:
    """The error to raise once the partial write is removed, so the free space it reports is what a retry gets."""
    return DiskFullError(f"no space left on device writing {what}: {human_bytes(free_bytes(folder))} free in {folder}, "
                         f"about {human_bytes(needed)} needed. {advice}")


def current_umask() -> int:
    """The process's umask: read where the OS tells it (Linux), else set and put straight back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (a file, or a folder and all in it) the permissions a plain open() or mkdir() gives under the
    umask. Writers that stage through mkstemp or mkdtemp (safetensors 0.8's save_file, TemporaryDirectory) leave
    0600 files and 0700 folders, which others on a shared machine cannot load."""
    mask = current_umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            executable = item.is_dir() or item.stat().st_mode & 0o111
            item.chmod((0o777 if executable else 0o666) & ~mask)
