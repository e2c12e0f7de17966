"""The on-disk format's fixed parts (docs/DATA.md is the spec): constants, member and shard names, and what
a manifest holds (Manifest, ShardInfo) with the checks that make it consistent.

A dataset is a directory (or bucket prefix) of tar shards plus one `manifest.json`. Each tar sample is a
chunk of whole consecutive documents: `<chunk>.tokens` (token ids, little-endian, dtype from the manifest,
EOD closing every document) and `<chunk>.lengths` (little-endian uint32 document lengths, EOD included).
Reading and writing a manifest is data/manifest_io.py; reading a shard back, data/chunks.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from data.errors import ManifestError
from data.locations import resolve

FORMAT_NAME = "glm5-tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENS_EXT, LENGTHS_EXT = "tokens", "lengths"
TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
LENGTHS_DTYPE = np.dtype("<u4")
BLOCK = 512  # a tar block


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
