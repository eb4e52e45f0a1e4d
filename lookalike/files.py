"""Durable file writes, for the index's segments and manifest and for back-indexing's checkpoints.

Its own module, importing nothing heavy, so that a process writing a checkpoint (``lookalike backfill``) does not
load FAISS with the index's modules.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Replace ``path`` by what ``write(temp_path)`` writes, so that a crash leaves the old file or the new one.

    The temporary file lives in the same folder (``os.replace`` is only atomic within one file system) and is
    flushed to disk before the rename; the folder is flushed after it so the rename itself survives a power cut.
    """
    path = Path(path)
    # Not mkstemp: its 0600 mode would hide the file from a plugin running as another user; 0666 minus umask.
    temp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temp)
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a platform or file system that cannot open folders: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
