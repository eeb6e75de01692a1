"""Files written whole or not at all: a value goes to a hidden temp file beside its final name and is
renamed over it, so a reader (or an index rebuilt at start-up) sees the old value or the new one,
never half of one; a writer killed mid-write leaves only a temp file, swept later.

One home for the mechanism the disk tier, the lm server's disk spill and the fs:// connector share.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Sequence

TEMP_PREFIX = ".tmp-"  # temp files are hidden: listings and index rebuilds skip names starting with "."
# Temp names unique across processes and hosts sharing a folder (random per process) and threads.
_WRITER_ID = uuid.uuid4().hex[:16]
_counter = itertools.count()

Buffer = bytes | bytearray | memoryview


def is_temp(name: str) -> bool:
    return name.startswith(TEMP_PREFIX)


def write_atomic(path: str | os.PathLike[str], parts: Sequence[Buffer], fsync: bool = False,
                 make_dirs: bool = False) -> int:
    """Write ``parts`` one after another into ``path`` atomically; returns the bytes written.

    ``fsync`` also flushes the file to the disk before the rename (survives a power loss; a killed
    process needs none). ``make_dirs`` creates a missing parent folder. Raises OSError (the temp
    file removed) when the disk refuses."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{_WRITER_ID}-{next(_counter)}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        if not make_dirs:
            raise
        os.makedirs(folder, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    total = 0
    try:
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:  # a write may be short: loop until every byte is out
                    written = os.write(fd, view)
                    if not written:
                        raise OSError(f"short write: {total} bytes written")
                    view = view[written:]
                    total += written
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return total


def sweep_temp_files(folder: str | os.PathLike[str], older_than_secs: float) -> int:
    """Remove the temp files of killed writers (older than ``older_than_secs``: younger ones may
    belong to a live writer on another process or host). Returns how many were removed."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if not is_temp(entry.name):
            continue
        try:
            if now - entry.stat().st_mtime >= older_than_secs:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass
    return removed
