"""Crash-safe writes: a reader (or a process killed mid-write) never sees half a file or folder.

Each write goes to a temporary name in the same folder and is renamed into place (os.replace,
atomic on POSIX within one file system). Plus the switch that keeps the HF libraries off the hub.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically, fsynced; a second process writing the same content at
    the same time is harmless (the shared caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_dir_atomically(dest: Path, fill: Callable[[str], None]) -> Path:
    """`fill(tmp_dir)` writes a folder's files; the folder then replaces `dest` whole. A crash
    leaves the old `dest` (or, between two renames, none) and hidden `.<name>.tmp<pid>*`
    folders, never a partial `dest`; dsgrow's next start in that `--out` removes them."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    fill(str(tmp))
    old = dest.parent / f".{dest.name}.tmp{os.getpid()}.old"
    if dest.exists():
        os.replace(dest, old)  # two renames: `dest` is missing only between them, never half-written
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def hf_offline(cache_dir: Optional[Path]) -> None:
    """HF libraries read these at import: never reach a hub, never write under ~/.cache."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if cache_dir is not None:
        os.environ.setdefault("HF_HOME", str(cache_dir / "hf_home"))
        os.environ.setdefault("HF_DATASETS_CACHE", str(cache_dir / "hf_home" / "datasets"))


__all__ = ["atomic_write_bytes", "atomic_write_text", "write_dir_atomically", "hf_offline"]
