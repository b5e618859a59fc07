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
    in page faults on first touch. Raising the mmap threshold and switching off heap trimming makes freed blocks
    reusable: the same results, the process keeps its peak memory reserved instead of returning it. (Allocators such
    as jemalloc or tcmalloc, preloaded, do the same; PyTorch's CPU allocator has no cache of its own.)

    Process-wide and idempotent. Returns True when applied (Linux with glibc), False elsewhere (a no-op).
    """
    global _KEPT
    if _KEPT:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # glibc's <malloc.h> parameter numbers
    # one arena: a block freed by one of PyTorch's worker threads is reusable by every other thread (a thread's own
    # arena cannot hold blocks above 64 MiB at all and falls back to fresh mappings)
    _KEPT = all(mallopt(param, value) for param, value in ((m_arena_max, 1), (m_mmap_threshold, int(mmap_threshold)),
                                                           (m_trim_threshold, 2**31 - 1)))
    return _KEPT
