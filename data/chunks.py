"""Reading one shard back as checked chunks (iter_chunks), and every document of a dataset (iter_documents).

Each chunk is checked as it is decoded (lengths add up, every document ends in EOD, ids below the vocab
size), and the whole shard against its manifest entry (counts; byte size when local).
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from data.errors import ShardError
from data.locations import is_remote
from data.schema import LENGTHS_DTYPE, LENGTHS_EXT, TOKENS_EXT, Manifest, ShardInfo
from data.streams import HashingReader, MappedFile, open_stream
from data.tar_reader import iter_tar


def decode_chunk(tokens: bytes, lengths: bytes, dtype: np.dtype, eod_id: int, where: str):
    """Member bytes -> (tokens, lengths) arrays, checked: lengths add up and every document ends in EOD."""
    if len(tokens) % dtype.itemsize or len(lengths) % LENGTHS_DTYPE.itemsize:
        raise ShardError(f"{where}: member sizes {len(tokens)}/{len(lengths)} are not whole {dtype} tokens / "
                         "uint32 lengths (wrong dtype in the manifest?)")
    tok = np.frombuffer(tokens, dtype)
    lens = np.frombuffer(lengths, LENGTHS_DTYPE)
    if lens.size == 0 or int(lens.sum(dtype=np.int64)) != tok.size or lens.min() == 0:
        raise ShardError(f"{where}: document lengths (n={lens.size}, sum={int(lens.sum(dtype=np.int64))}) do not "
                         f"match the {tok.size} tokens")
    ends = np.cumsum(lens, dtype=np.int64) - 1
    if not (tok[ends] == eod_id).all():
        raise ShardError(f"{where}: a document does not end with EOD id {eod_id} (corrupt data, or another EOD)")
    return tok, lens


def iter_chunks(location: str, info: ShardInfo, manifest: Manifest, *, start_chunk: int = 0,
                vocab_size: int | None = None, digest=None,
                buffers: dict | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(chunk index, tokens, lengths) of one shard from chunk `start_chunk` on; the whole shard is checked
    against its manifest entry (counts; size when local) and every token against vocab_size. With `digest`
    (a hashlib object) every byte of the shard goes through it, trailing padding included. With `buffers`
    (a dict kept by the caller) members are read into reused buffers, so the arrays yielded are overwritten
    by the next chunk: copy what must outlive it."""
    if not is_remote(location):
        try:
            size = os.path.getsize(location)
        except OSError:
            raise ShardError(f"{location}: shard is missing") from None
        if size != info.bytes:
            raise ShardError(f"{location}: shard is {size} bytes, its manifest entry says {info.bytes} "
                             "(truncated, or the manifest does not match)")
    dtype, docs, tokens, chunk, stopped = manifest.np_dtype, 0, 0, 0, False
    pending: dict[str, bytes | None] = {}

    def skip_tokens(name: str) -> bool:  # on resume, seek over the token bytes of chunks before start_chunk
        key, _, ext = name.partition(".")
        return ext == TOKENS_EXT and key.isdigit() and int(key) < start_chunk

    try:
        mapped = digest is None and not is_remote(location)
        try:
            raw = MappedFile(location) if mapped else open_stream(location)
        except (ValueError, OSError):  # a file system without mmap: read it like a stream
            if not mapped:
                raise
            mapped, raw = False, open_stream(location)
        with raw:
            stream = raw if digest is None else HashingReader(raw, digest)
            for name, data in iter_tar(stream, location, skip=skip_tokens, buffers=None if mapped else buffers):
                key, _, ext = name.partition(".")
                if ext not in (TOKENS_EXT, LENGTHS_EXT) or not key.isdigit():
                    raise ShardError(f"{location}: unexpected member {name!r}")
                if pending and key != pending["key"]:
                    raise ShardError(f"{location}: chunk {pending['key']} lacks one of its .{TOKENS_EXT}/"
                                     f".{LENGTHS_EXT} members")
                pending["key"] = key
                pending[ext] = data
                if TOKENS_EXT not in pending or LENGTHS_EXT not in pending:
                    continue
                if int(key) != chunk:
                    raise ShardError(f"{location}: chunk {key} is out of order (expected {chunk:06d})")
                if pending[TOKENS_EXT] is None:  # skipped on resume: count it, do not decode it
                    lens = np.frombuffer(pending[LENGTHS_EXT], LENGTHS_DTYPE)
                    docs, tokens = docs + lens.size, tokens + int(lens.sum(dtype=np.int64))
                else:
                    where = f"{location}: chunk {key}"
                    tok, lens = decode_chunk(pending[TOKENS_EXT], pending[LENGTHS_EXT], dtype, manifest.eod_id, where)
                    if vocab_size is not None and int(tok.max()) >= vocab_size:
                        raise ShardError(f"{where}: token id {int(tok.max())} is >= the vocab size {vocab_size}")
                    docs, tokens = docs + lens.size, tokens + tok.size
                    try:
                        yield chunk, tok, lens
                    except GeneratorExit:
                        stopped = True
                        raise
                chunk += 1
                pending = {}
            while digest is not None and stream.read(1 << 20):
                pass
    except ShardError:
        raise
    except FileNotFoundError:
        raise ShardError(f"{location}: shard is missing") from None
    except (OSError, ValueError) as e:
        if stopped:  # closed early: a downloader killed by SIGPIPE may exit non-zero, which is no error
            return
        raise ShardError(f"{location}: cannot read shard: {e}") from e
    if pending:
        raise ShardError(f"{location}: chunk {pending['key']} is incomplete")
    if (docs, tokens) != (info.docs, info.tokens) or (info.chunks >= 0 and chunk != info.chunks):
        raise ShardError(f"{location}: holds {chunk} chunks / {docs} docs / {tokens} tokens, its manifest entry "
                         f"says {info.chunks} / {info.docs} / {info.tokens}")


def iter_documents(manifest: Manifest) -> Iterator[np.ndarray]:
    """Every document (EOD included) in manifest order, unshuffled; for tools and tests."""
    for i, info in enumerate(manifest.shards):
        for _, tok, lens in iter_chunks(manifest.shard_url(i), info, manifest):
            ends = np.cumsum(lens, dtype=np.int64)
            for a, b in zip((ends - lens).tolist(), ends.tolist()):
                yield tok[a:b]
