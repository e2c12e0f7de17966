"""ShardWriter: tokenized documents -> chunks -> tar shards -> manifest.json (written last).

Output bytes depend only on the documents and the settings: tar headers carry fixed mtime/uid/gid/mode and
no user names, members are named by chunk index, and there are no timestamps anywhere. A shard is
written as `shard_NNNNNN.tar.tmp` and renamed when complete, so a crash never leaves a plausible shard,
and the manifest (temp file + os.replace) appears only after every shard it lists.
"""

from __future__ import annotations

import hashlib
import os
import tarfile

import numpy as np

from data.manifest_io import write_manifest
from data.schema import (BLOCK, LENGTHS_DTYPE, LENGTHS_EXT, MANIFEST_NAME, TOKEN_DTYPES, TOKENS_EXT, Manifest,
                         ShardInfo, member_name, shard_name)

_END = bytes(2 * BLOCK)  # end-of-archive marker


def _member_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


class _Shard:
    """One tar file being written, hashed as it goes."""

    def __init__(self, directory: str, index: int, prefix: str = ""):
        self.name = shard_name(index, prefix)
        self.final = os.path.join(directory, self.name)
        self.tmp = self.final + ".tmp"
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.bytes = self.docs = self.tokens = self.chunks = 0
        self.max_token_id = -1

    def _write(self, data: bytes | memoryview) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.bytes += len(data)

    def add_member(self, name: str, data: bytes | memoryview) -> None:
        self._write(_member_header(name, len(data)))
        self._write(data)
        if len(data) % BLOCK:
            self._write(bytes(BLOCK - len(data) % BLOCK))

    def close(self) -> ShardInfo:
        self._write(_END)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)
        return ShardInfo(path=self.name, docs=self.docs, tokens=self.tokens, bytes=self.bytes,
                         sha256=self.hash.hexdigest(), chunks=self.chunks, max_token_id=self.max_token_id)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def chunk_bytes(num_tokens: int, num_docs: int, itemsize: int) -> int:
    """Bytes one chunk takes in a tar: two headers plus both members padded to 512."""
    pad = lambda n: n + (-n % BLOCK)
    return 2 * BLOCK + pad(num_tokens * itemsize) + pad(num_docs * LENGTHS_DTYPE.itemsize)


class ShardWriter:
    """Append documents; chunks of about `chunk_tokens` whole documents go into shards of at most
    `shard_size` bytes (a single chunk larger than that gets a shard of its own).

    With `prefix`, the files are `<prefix>shard_NNNNNN.tar` and `<prefix>manifest.json`, so several writers
    (the tasks of a split run, a validation split) share a directory. `part` goes into the manifest as it is
    (see data/schema.py, Manifest.part); a part manifest may list no shards."""

    def __init__(self, output_dir: str, *, tokenizer: dict, eod_id: int, dtype: str = "uint32",
                 shard_size: int = 1 << 30, chunk_tokens: int = 1 << 20, prefix: str = "",
                 part: dict | None = None):
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {sorted(TOKEN_DTYPES)}")
        if not 0 <= eod_id <= np.iinfo(TOKEN_DTYPES[dtype]).max:
            raise ValueError(f"EOD id {eod_id} does not fit dtype {dtype}")
        if chunk_tokens <= 0 or shard_size <= 0:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) and shard_size ({shard_size}) must be positive")
        os.makedirs(output_dir, exist_ok=True)
        self.prefix, self.manifest_name = prefix, prefix + MANIFEST_NAME
        for existing in os.listdir(output_dir):
            if existing == self.manifest_name or existing.startswith(prefix + "shard_"):
                raise FileExistsError(f"{output_dir} already holds a dataset ({existing}); use an empty directory")
        self.part = part
        self.output_dir, self.tokenizer, self.eod_id = output_dir, tokenizer, eod_id
        self.dtype, self.np_dtype = dtype, TOKEN_DTYPES[dtype]
        self.shard_size, self.chunk_tokens = shard_size, chunk_tokens
        self._limit = np.iinfo(self.np_dtype).max
        self._tokens: list[np.ndarray] = []  # the chunk being filled
        self._lengths: list[np.ndarray] = []
        self._pending = 0
        self._shard: _Shard | None = None
        self._shards: list[ShardInfo] = []
        self._closed = False

    # --- input -----------------------------------------------------------------------------------
    def add_document(self, ids) -> None:
        """One document's token ids, without EOD (appended here)."""
        ids = np.asarray(ids)
        doc = np.empty(ids.size + 1, self.np_dtype)
        self._check_ids(ids)
        doc[:-1] = ids
        doc[-1] = self.eod_id
        self.add_documents(doc, np.array([doc.size], LENGTHS_DTYPE))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Many documents at once: `tokens` concatenated, each already ending in EOD; `lengths` include it."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size == 0:
            return
        ends = np.cumsum(lengths)
        if (lengths <= 0).any() or ends[-1] != len(tokens):
            raise ValueError(f"lengths (n={lengths.size}, sum={int(ends[-1])}) do not match the {len(tokens)} tokens")
        if not (np.asarray(tokens)[ends - 1] == self.eod_id).all():
            raise ValueError(f"every document must end with the EOD id {self.eod_id}")
        self._check_ids(tokens)
        tokens = np.asarray(tokens).astype(self.np_dtype, copy=False)
        start, first = 0, 0
        while first < lengths.size:  # cut at the first document that fills the chunk
            need = self.chunk_tokens - self._pending
            last = min(int(np.searchsorted(ends, start + need, side="left")), lengths.size - 1)
            stop = int(ends[last])
            self._tokens.append(tokens[start:stop])
            self._lengths.append(lengths[first:last + 1])
            self._pending += stop - start
            start, first = stop, last + 1
            if self._pending >= self.chunk_tokens:
                self._flush_chunk()

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) > self._limit):
            raise ValueError(f"token ids span [{int(ids.min())}, {int(ids.max())}], outside dtype {self.dtype}")

    # --- output ----------------------------------------------------------------------------------
    def _flush_chunk(self) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._tokens).astype(self.np_dtype, copy=False)
        lengths = np.concatenate(self._lengths).astype(LENGTHS_DTYPE)
        self._tokens, self._lengths, self._pending = [], [], 0
        size = chunk_bytes(tokens.size, lengths.size, self.np_dtype.itemsize)
        if self._shard is not None and self._shard.chunks and self._shard.bytes + size + len(_END) > self.shard_size:
            self._shards.append(self._shard.close())
            self._shard = None
        if self._shard is None:
            self._shard = _Shard(self.output_dir, len(self._shards), self.prefix)
        shard = self._shard
        shard.add_member(member_name(shard.chunks, TOKENS_EXT), memoryview(tokens).cast("B"))
        shard.add_member(member_name(shard.chunks, LENGTHS_EXT), memoryview(lengths).cast("B"))
        shard.chunks += 1
        shard.docs += lengths.size
        shard.tokens += tokens.size
        shard.max_token_id = max(shard.max_token_id, int(tokens.max()))

    def close(self) -> Manifest:
        """Finish the last chunk and shard, then write the manifest; returns it."""
        if self._closed:
            raise RuntimeError("ShardWriter.close() called twice")
        self._flush_chunk()
        if self._shard is not None:
            self._shards.append(self._shard.close())
            self._shard = None
        self._closed = True
        if not self._shards and self.part is None:
            raise ValueError(f"no documents were written to {self.output_dir}")
        manifest = Manifest(tokenizer=self.tokenizer, dtype=self.dtype, eod_id=self.eod_id, shards=self._shards,
                            total_docs=sum(s.docs for s in self._shards),
                            total_tokens=sum(s.tokens for s in self._shards), chunk_tokens=self.chunk_tokens,
                            location=os.path.join(self.output_dir, self.manifest_name),
                            part=self.part)
        write_manifest(manifest, manifest.location)
        return manifest

    @property
    def shards_written(self) -> int:
        return len(self._shards)

    @property
    def is_empty(self) -> bool:
        """No document added yet."""
        return not self._pending and not self._shards and self._shard is None

    def abort(self) -> None:
        """Drop the shard in progress (no manifest is written); complete shards stay for inspection."""
        if self._shard is not None:
            self._shard.abort()
            self._shard = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort()
