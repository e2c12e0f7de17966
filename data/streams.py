"""The byte streams a shard or manifest is read through.

Remote locations are opened with webdataset's `gopen` (http(s) via curl, `pipe:` commands; `s3://` is mapped
to `pipe:aws s3 cp URL -`); which locations a manifest may name is data/locations.py. Local shards are
memory-mapped (MappedFile: no read copy; a resume seeks over skipped chunks for free). HashingReader feeds
every byte read to a hash, for the sha256 check of a whole shard.
"""

from __future__ import annotations

import mmap
import os
import shlex
from typing import BinaryIO

from data.locations import is_remote


def open_stream(location: str) -> BinaryIO:
    """Open a local path, URL or pipe: command for reading (webdataset's gopen; s3:// goes through the aws CLI)."""
    if location.startswith("s3://"):
        location = f"pipe:aws s3 cp {shlex.quote(location)} -"
    if not is_remote(location):
        return open(location, "rb")
    import webdataset as wds  # imported here: local files (writing, loading a manifest) do not need it (~2 s)

    return wds.gopen(location, "rb")


class MappedFile:
    """A local shard mapped into memory: read() returns views into the page cache, so chunks cost no read copy."""

    def __init__(self, path: str):
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._mm.madvise(mmap.MADV_SEQUENTIAL)
        self._view, self._pos = memoryview(self._mm), 0

    def read(self, n: int = -1) -> memoryview:
        end = len(self._view) if n < 0 else min(self._pos + n, len(self._view))
        data, self._pos = self._view[self._pos:end], end
        return data

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> None:
        self._pos = offset if whence == os.SEEK_SET else self._pos + offset

    def __enter__(self) -> "MappedFile":
        return self

    def __exit__(self, *exc) -> None:
        self._view = None  # the mapping closes once the arrays viewing it are gone


class HashingReader:
    """A read-only stream that feeds everything read through it to a hash (no seeking)."""

    def __init__(self, stream: BinaryIO, digest):
        self.stream, self.digest = stream, digest

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def seekable(self) -> bool:
        return False
