"""The server's disk spill: values evicted from memory, one file each, LRU within a byte budget.

Files are written atomically (atomic_files.py), so a reader (or a restarted server rebuilding its
index) never sees half a value. Each file starts with its key, so the index is
rebuilt from the folder at start-up and a hash collision in file names cannot return the wrong
value. Disk faults (full, read-only, files deleted underneath) lose the value, never the server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from ..atomic_files import is_temp, sweep_temp_files, write_atomic
from ..lm_protocol import new_buffer
from ..lru import ByteLRU

logger = logging.getLogger(__name__)

FILE_MAGIC = b"LMKVSPIL"
FILE_HEADER = struct.Struct("<8sIQ")  # magic, key length, value length
SUFFIX = ".kv"


class DiskSpill:
    """Synchronous file store used from the server's event loop thread."""

    def __init__(self, folder: str | os.PathLike[str], budget: int) -> None:
        self.folder = Path(folder)
        self.budget = budget
        self.write_failures = 0
        self._index: ByteLRU[bytes, int] = ByteLRU(budget)  # key -> (value size, file size), LRU first
        #: Called with each key the spill drops by itself (evicted for room, or unreadable), so the
        #: store's key index learns of it; deletes and replacements the store asks for are not reported.
        self.on_drop: Callable[[bytes], None] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used(self) -> int:
        return self._index.used

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._index)

    def value_sizes(self) -> Iterator[tuple[bytes, int]]:
        """(key, value size) of every file."""
        return zip(self._index, self._index.values(), strict=True)

    def write(self, key: bytes, value: bytes | bytearray | memoryview) -> bool:
        """Store ``key``; False when it does not fit the budget or the disk failed."""
        size = FILE_HEADER.size + len(key) + len(value)
        if size > self.budget:
            return False
        self.delete(key)
        for old, _ in self._index.evict(size):
            _unlink(self._path(old))
            self._dropped(old)
        final = self._path(key)
        try:
            write_atomic(final, [FILE_HEADER.pack(FILE_MAGIC, len(key), len(value)) + key, value])
        except OSError as exc:
            self.write_failures += 1
            logger.warning("disk spill: cannot write %s: %s (value dropped)", final, exc.strerror or exc)
            return False
        self._index.add(key, len(value), size)
        return True

    def read(self, key: bytes) -> bytearray | None:
        """The value of ``key`` (and mark it recently used), or None; a bad file is removed."""
        if key not in self._index:
            return None
        path = self._path(key)
        try:
            with open(path, "rb") as fh:
                stored_key, value_len = _read_header(fh)
                if stored_key != key:
                    raise ValueError("file holds another key")
                value = new_buffer(value_len)
                if fh.readinto(value) != value_len or fh.read(1):
                    raise ValueError("file length does not match its header")
        except (OSError, ValueError, struct.error) as exc:
            logger.warning("disk spill: dropping unreadable %s: %s", path, exc)
            self._remove(key)
            self._dropped(key)
            return None
        self._index.get(key)  # now the most recently used
        return value

    def delete(self, key: bytes) -> bool:
        if key not in self._index:
            return False
        self._remove(key)
        return True

    def _remove(self, key: bytes) -> None:
        self._index.pop(key)
        _unlink(self._path(key))

    def _dropped(self, key: bytes) -> None:
        if self.on_drop is not None:
            self.on_drop(key)

    def _path(self, key: bytes) -> Path:
        return self.folder / (hashlib.blake2b(key, digest_size=16).hexdigest() + SUFFIX)

    def _rebuild_index(self) -> None:
        """Index the files a previous run left, oldest first; drop temporaries and over-budget files."""
        found: list[tuple[float, bytes, int, int]] = []
        sweep_temp_files(self.folder, 0.0)  # the server owns its folder: every temp file is a dead writer's
        for path in self.folder.iterdir():
            if is_temp(path.name):
                continue
            if path.suffix != SUFFIX:
                continue
            try:
                stat = path.stat()
                with open(path, "rb") as fh:
                    key, value_len = _read_header(fh)
                if stat.st_size != FILE_HEADER.size + len(key) + value_len or path != self._path(key):
                    raise ValueError("size or name does not match its header")
            except (OSError, ValueError, struct.error) as exc:
                logger.warning("disk spill: removing unreadable %s: %s", path, exc)
                _unlink(path)
                continue
            found.append((stat.st_mtime, key, value_len, stat.st_size))
        for _mtime, key, value_len, size in sorted(found):
            self._index.add(key, value_len, size)
        for old, _ in self._index.evict():
            _unlink(self._path(old))
        if self._index:
            logger.info("disk spill: %d values (%d bytes) found in %s", len(self._index), self.used, self.folder)


def _read_header(fh) -> tuple[bytes, int]:
    raw = fh.read(FILE_HEADER.size)
    magic, key_len, value_len = FILE_HEADER.unpack(raw)
    if magic != FILE_MAGIC:
        raise ValueError("not a spill file")
    key = fh.read(key_len)
    if len(key) != key_len:
        raise ValueError("truncated key")
    return key, value_len


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("disk spill: cannot remove %s: %s", path, exc)
