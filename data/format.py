"""The on-disk format: constants, the manifest, and reading one shard back (docs/DATA.md is the spec).

A dataset is a directory (or bucket prefix) of tar shards plus one `manifest.json`. Each tar sample is a
chunk of whole consecutive documents: `<chunk>.tokens` (token ids, little-endian, dtype from the manifest,
EOD closing every document) and `<chunk>.lengths` (little-endian uint32 document lengths, EOD included).

Remote shards are opened with webdataset's `gopen` (http(s) via curl, `pipe:` commands; `s3://` is mapped
to `pipe:aws s3 cp URL -`); a manifest naming a `pipe:` command is refused unless the caller allows it
(check_shard_locations); local shards are memory-mapped (no read copy; a resume seeks over skipped chunks
for free). Tar headers are parsed here rather than by tarfile's stream mode, which webdataset's iterator uses
and which reads 4 MiB members in 10 KiB pieces: about 6x slower (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shlex
import tarfile
from dataclasses import asdict, dataclass
from typing import BinaryIO, Iterator

import numpy as np

FORMAT_NAME = "glm5-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_EXT, LENGTHS_EXT = "tokens", "lengths"
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
LENGTHS_DTYPE = np.dtype("<u4")
BLOCK = 512
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DATA_SCHEMES = ("http", "https", "s3", "gs")  # what a manifest may name: opened without a shell, by URL alone


class ShardError(RuntimeError):
    """A shard that cannot be read, or does not match its manifest entry; the message names the shard."""


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent; the message names the manifest."""


def shard_name(index: int, prefix: str = "") -> str:
    return f"{prefix}shard_{index:06d}.tar"


def member_name(chunk: int, ext: str) -> str:
    return f"{chunk:06d}.{ext}"


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the manifest, absolute, a URL or a pipe: command
    docs: int
    tokens: int
    bytes: int
    sha256: str
    chunks: int = -1  # optional fields: -1 when a producer did not record them
    max_token_id: int = -1


@dataclass
class Manifest:
    tokenizer: dict  # {"name", "sha256", "vocab_size"}: see data/tokenizer.py
    dtype: str
    eod_id: int
    shards: list[ShardInfo]
    total_docs: int
    total_tokens: int
    chunk_tokens: int = 0
    location: str = ""  # where it was loaded from: not written, used to resolve relative shard paths
    part: dict | None = None  # only in a part manifest (one task of a split run): {"index", "count", "inputs"}

    @property
    def np_dtype(self) -> np.dtype:
        return TOKEN_DTYPES[self.dtype]

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "tokenizer": self.tokenizer, "dtype": self.dtype,
            "eod_id": self.eod_id, "chunk_tokens": self.chunk_tokens, "total_docs": self.total_docs,
            "total_tokens": self.total_tokens,
            **({"part": self.part} if self.part is not None else {}),
            "shards": [asdict(s) for s in self.shards],
        }

    def shard_url(self, index: int) -> str:
        return resolve(self.location, self.shards[index].path)

    def validate(self) -> None:
        where = self.location or "manifest"
        if self.dtype not in TOKEN_DTYPES:
            raise ManifestError(f"{where}: dtype {self.dtype!r} is not one of {sorted(TOKEN_DTYPES)}")
        if not 0 <= self.eod_id < np.iinfo(self.np_dtype).max + 1:
            raise ManifestError(f"{where}: eod_id {self.eod_id} does not fit dtype {self.dtype}")
        if not self.shards and self.part is None:  # a part (one task's share) may be empty
            raise ManifestError(f"{where}: lists no shards")
        seen = set()
        for s in self.shards:
            if s.path in seen:
                raise ManifestError(f"{where}: shard {s.path} is listed twice")
            seen.add(s.path)
            if s.docs <= 0 or s.tokens < s.docs or s.bytes < s.tokens * self.np_dtype.itemsize:
                raise ManifestError(f"{where}: shard {s.path} has impossible counts "
                                    f"(docs={s.docs}, tokens={s.tokens}, bytes={s.bytes})")
        docs, tokens = sum(s.docs for s in self.shards), sum(s.tokens for s in self.shards)
        if (docs, tokens) != (self.total_docs, self.total_tokens):
            raise ManifestError(f"{where}: total_docs/total_tokens are {self.total_docs}/{self.total_tokens} "
                                f"but the shards add up to {docs}/{tokens}")


# --- locations ---------------------------------------------------------------------------------
def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or bool(_URL.match(location))


def resolve(manifest_location: str, path: str) -> str:
    """A shard path as written in a manifest -> something `open_stream` opens."""
    if is_remote(path) or os.path.isabs(path):
        return path
    if manifest_location.startswith("pipe:"):
        raise ManifestError(f"{manifest_location}: relative shard path {path!r} in a manifest read through "
                            "pipe: cannot be resolved; give the manifest as a URL (s3://, https://) or a local file, "
                            "or write absolute shard paths")
    if _URL.match(manifest_location):
        return manifest_location.rsplit("/", 1)[0] + "/" + path
    return os.path.join(os.path.dirname(manifest_location), path)


def open_stream(location: str) -> BinaryIO:
    """Open a local path, URL or pipe: command for reading (webdataset's gopen; s3:// goes through the aws CLI)."""
    if location.startswith("s3://"):
        location = f"pipe:aws s3 cp {shlex.quote(location)} -"
    if not is_remote(location):
        return open(location, "rb")
    import webdataset as wds  # imported here: local files (writing, loading a manifest) do not need it (~2 s)

    return wds.gopen(location, "rb")


def check_shard_locations(paths: list[str], where: str, allow_pipe: bool = False) -> None:
    """A manifest is data: its shard locations are paths or URLs (DATA_SCHEMES), never commands. `pipe:` (and
    any other scheme, which webdataset would hand to some program) only with allow_pipe, an explicit choice of
    whoever runs the reader; a `pipe:` manifest location given on the command line is such a choice already."""
    if allow_pipe:
        return
    for path in paths:
        if not isinstance(path, str):
            raise ManifestError(f"{where}: shard path {path!r} is not a string")
        scheme = path.split(":", 1)[0].lower() if path.startswith("pipe:") or _URL.match(path) else None
        if scheme is not None and scheme not in DATA_SCHEMES:
            raise ManifestError(f"{where}: shard {path!r} is a {scheme}: location; a manifest is data and may name "
                                f"only paths and {'/'.join(DATA_SCHEMES)} URLs, never a command (if you wrote it "
                                "and trust it, allow it explicitly: allow_pipe=True / --data-allow-pipe)")


# --- manifest I/O --------------------------------------------------------------------------------
def load_manifest(location: str, *, allow_pipe: bool = False) -> Manifest:
    """Read and validate a manifest; shard locations that would run a command are refused unless allow_pipe."""
    try:
        with open_stream(location) as f:
            raw = f.read()
        obj = json.loads(raw)
    except FileNotFoundError:
        raise ManifestError(f"{location}: manifest not found") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{location}: cannot read the manifest: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise ManifestError(f"{location}: not a {FORMAT_NAME} manifest (its 'format' field is "
                            f"{obj.get('format') if isinstance(obj, dict) else None!r})")
    if obj.get("version") != FORMAT_VERSION:
        raise ManifestError(f"{location}: format version {obj.get('version')} is not the supported {FORMAT_VERSION}")
    try:
        check_shard_locations([s["path"] for s in obj["shards"]], location, allow_pipe)
        shards = [ShardInfo(**s) for s in obj["shards"]]
        m = Manifest(tokenizer=obj["tokenizer"], dtype=obj["dtype"], eod_id=int(obj["eod_id"]), shards=shards,
                     total_docs=int(obj["total_docs"]), total_tokens=int(obj["total_tokens"]),
                     chunk_tokens=int(obj.get("chunk_tokens", 0)), location=location,
                     part=obj.get("part"))
    except (KeyError, TypeError) as e:
        raise ManifestError(f"{location}: missing or malformed field: {e}") from e
    m.validate()
    return m


def write_manifest(manifest: Manifest, path: str) -> None:
    """Write atomically (temp file + os.replace): a manifest on disk always describes complete shards."""
    manifest.validate()
    tmp = f"{path}.tmp"
    obj = manifest.to_json()
    shards = obj.pop("shards")
    head = json.dumps(obj, indent=1)[:-2]  # one shard per line: readable, and ~150 bytes a shard at 106k shards
    lines = ",\n  ".join(json.dumps(s, separators=(", ", ": ")) for s in shards)
    with open(tmp, "w") as f:
        f.write(f'{head},\n "shards": [\n  {lines}\n ]\n}}\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- reading a shard -----------------------------------------------------------------------------
def _read_exact(stream: BinaryIO, n: int, where: str, what: str) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes may return short reads
        more = stream.read(n - len(data))
        if not more:
            raise ShardError(f"{where}: truncated: {what} needs {n} bytes, the stream ended after {len(data)}")
        data += more
    return data


def _skip(stream: BinaryIO, n: int, where: str, what: str) -> None:
    if n and getattr(stream, "seekable", lambda: False)():
        stream.seek(n, os.SEEK_CUR)
    elif n:
        _read_exact(stream, n, where, what)


def _read_into(stream: BinaryIO, buffers: dict, key: str, n: int, where: str, what: str) -> memoryview:
    """Read n bytes into a buffer reused across calls: fresh 4 MiB allocations per chunk cost page faults."""
    buf = buffers.get(key)
    if buf is None or len(buf) < n:
        buf = buffers[key] = bytearray(max(n, 1))
    view = memoryview(buf)[:n]
    readinto = getattr(stream, "readinto", None)
    if readinto is None:
        view[:] = _read_exact(stream, n, where, what)
        return view
    got = 0
    while got < n:
        k = readinto(view[got:])
        if not k:
            raise ShardError(f"{where}: truncated: {what} needs {n} bytes, the stream ended after {got}")
        got += k
    return view


def iter_tar(stream: BinaryIO, where: str, skip=None,
             buffers: dict | None = None) -> Iterator[tuple[str, bytes | memoryview | None]]:
    """(name, data) for each regular file of a tar stream; data is None (not read) where skip(name).

    With `buffers` (a dict), data is a memoryview into a buffer reused per member extension: valid only until
    the next member with the same extension."""
    long_name = None
    while True:
        header = stream.read(BLOCK)
        while 0 < len(header) < BLOCK:  # pipes may return short reads
            more = stream.read(BLOCK - len(header))
            if not more:
                break
            header += more
        if header == bytes(BLOCK):
            return  # end-of-archive
        if len(header) < BLOCK:
            raise ShardError(f"{where}: truncated: the tar stream ends without its end-of-archive blocks")
        header = bytes(header)
        try:
            stored = int(header[148:156].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{where}: corrupt tar header (unreadable checksum)") from None
        unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in header[:148] + header[156:]):
            raise ShardError(f"{where}: corrupt tar header (checksum mismatch)")  # (old tars sum signed chars)
        try:
            size = tarfile.nti(header[124:136])
        except tarfile.InvalidHeaderError:
            raise ShardError(f"{where}: corrupt tar header (unreadable size)") from None
        kind = header[156:157]
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        name = long_name or (f"{prefix}/{name}" if prefix else name)
        padding = -size % BLOCK
        if kind in (b"x", b"L"):  # pax / GNU long names written by other producers
            data = bytes(_read_exact(stream, size, where, "an extended header"))
            _skip(stream, padding, where, "padding")
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
            else:
                found = re.search(rb"\d+ path=([^\n]*)\n", data)
                long_name = found.group(1).decode("utf-8", "replace") if found else None
            continue
        long_name = None
        if kind not in (b"0", b"\0", b"7"):
            _skip(stream, size + padding, where, f"member {name}")
            continue
        if skip is not None and skip(name):
            _skip(stream, size + padding, where, f"member {name}")
            yield name, None
        else:
            if buffers is None:
                data = _read_exact(stream, size, where, f"member {name}")
            else:
                data = _read_into(stream, buffers, name.rpartition(".")[2], size, where, f"member {name}")
            _skip(stream, padding, where, "padding")
            yield name, data


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


class _Mapped:
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

    def __enter__(self) -> "_Mapped":
        return self

    def __exit__(self, *exc) -> None:
        self._view = None  # the mapping closes once the arrays viewing it are gone


class _Hashing:
    """A read-only stream that feeds everything read through it to a hash (no seeking)."""

    def __init__(self, stream: BinaryIO, digest):
        self.stream, self.digest = stream, digest

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        return data

    def seekable(self) -> bool:
        return False


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
            raw = _Mapped(location) if mapped else open_stream(location)
        except (ValueError, OSError):  # a file system without mmap: read it like a stream
            if not mapped:
                raise
            mapped, raw = False, open_stream(location)
        with raw:
            stream = raw if digest is None else _Hashing(raw, digest)
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
