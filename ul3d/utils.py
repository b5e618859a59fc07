"""Utilities shared by every layer of ul3d (no dependency on the rest of the package)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "keep_freed_memory"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Nothing half-written is ever left at ``path``: a reader sees the old file or the complete new one.

    Args:
        path: the final file.
        suffix: appended to the temporary name (``.<name>.XXXX.tmp<suffix>``), for writers that choose the
            file format from the extension (e.g. ``".nii.gz"``). Default: none.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp makes the file private (0600): give it the permissions of a normal new file
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


_KEPT = False


def keep_freed_memory(mmap_threshold: int = 1 << 30) -> bool:
    """Let glibc's malloc serve large blocks from its heap and keep freed memory for the next allocation.

    By default glibc maps every block above its mmap threshold (128 KiB, adapting up to 32 MiB) fresh from the kernel
    and unmaps it when freed, so each new full-size activation of a 3D network (tens of MB on the CPU) is paid again
    in page faults on first touch. Raising the mmap threshold (to ``mmap_threshold``, or glibc's cap of 32 MiB where
    an older glibc refuses more), switching off heap trimming and using one arena (a thread's own arena cannot hold
    blocks above 64 MiB and falls back to fresh mappings) makes freed blocks reusable: the same results, while the
    process keeps its peak memory reserved instead of returning it. Allocators such as jemalloc or tcmalloc,
    preloaded, do the same (then this is a no-op). ul3d's CPU :class:`~ul3d.engine.infer.Predictor` calls it.

    Process-wide and idempotent. Returns True when the threshold and trimming settings are in effect (Linux with
    glibc), False elsewhere (nothing changed) or when glibc refused them.
    """
    global _KEPT
    if _KEPT:
        return True
    preload = os.environ.get("LD_PRELOAD", "")
    if not sys.platform.startswith("linux") or "jemalloc" in preload or "tcmalloc" in preload:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's <malloc.h> parameter numbers
    threshold = bool(mallopt(m_mmap_threshold, int(mmap_threshold))) or bool(mallopt(m_mmap_threshold, 32 << 20))
    trim = bool(mallopt(m_trim_threshold, 2**31 - 1))
    mallopt(m_arena_max, 1)  # best effort: threads that already have an arena keep it
    _KEPT = threshold and trim
    return _KEPT
