"""Input documents to token batches: the worker path of tools/preprocess_data.py (docs/DATA.md).

read_batches (main process) reads jsonl(.gz) / parquet / plain-text files into batches, in input order;
encode_batch (a worker, after init_worker) parses a batch, holds out the documents whose content hash
falls below the valid fraction, tokenizes and packs the rest with EOD after each document.
tools/bench_preprocess.py times the same path.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from data.schema import LENGTHS_DTYPE, TOKEN_DTYPES
from data.tokenizer import load_tokenizer

BATCH_DOCS, BATCH_BYTES = 1024, 4 << 20
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_HASH_PERSON = b"glm5-valid"


# --- reading inputs (the main process) -------------------------------------------------------------
def _kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    return "parquet" if name.endswith(".parquet") else "text"


def read_batches(paths: list[str], json_key: str):
    """Tasks for the workers, in input order: (kind, path, first line number, payloads)."""
    texts: list[tuple[str, str]] = []  # plain-text files are batched together
    size = 0
    for path in paths:
        kind = _kind(path)
        if kind == "text":
            try:
                texts.append((path, Path(path).read_text(encoding="utf-8")))
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            size += len(texts[-1][1])
            if len(texts) >= BATCH_DOCS or size >= BATCH_BYTES:
                yield "text", "", 0, texts
                texts, size = [], 0
            continue
        if texts:
            yield "text", "", 0, texts
            texts, size = [], 0
        if kind == "json":
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rb") as f:
                lines, first, nbytes = [], 1, 0
                for number, line in enumerate(f, 1):
                    lines.append(line)
                    nbytes += len(line)
                    if len(lines) >= BATCH_DOCS or nbytes >= BATCH_BYTES:
                        yield "json", path, first, lines
                        lines, first, nbytes = [], number + 1, 0
                if lines:
                    yield "json", path, first, lines
        else:
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if json_key not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no column {json_key!r} (--json-key); columns: {pf.schema_arrow.names}")
            for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=[json_key]):
                yield "text", "", 0, [(path, t) for t in batch.column(0).to_pylist()]
    if texts:
        yield "text", "", 0, texts


# --- tokenizing (the workers) ----------------------------------------------------------------------
_TOK = None  # set by init_worker in each worker process: (tokenizer, numpy dtype, json key, valid fraction)


def init_worker(tokenizer_dir: str, eod_token: str | None, dtype: str, json_key: str, parallel: bool,
                 valid_fraction: float = 0.0) -> None:
    global _TOK
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _TOK = (load_tokenizer(tokenizer_dir, eod_token), TOKEN_DTYPES[dtype], json_key, valid_fraction)


def is_valid_doc(text: str, fraction: float) -> bool:
    """The held-out decision: a 64-bit hash of the text below fraction * 2^64 (so duplicates go together)."""
    h = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, person=_HASH_PERSON).digest()
    return int.from_bytes(h, "little") < fraction * 2.0 ** 64


def _pack(ids: list[list[int]], eod_id: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(x) + 1 for x in ids], dtype=LENGTHS_DTYPE)
    tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        tokens[pos + len(x)] = eod_id
        pos += len(x) + 1
    return tokens, lengths


def encode_batch(task) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """One read_batches task -> (training tokens with EOD after each document, their lengths, the same for
    held-out documents, number of empty documents dropped)."""
    kind, path, first, payload = task
    tok, dtype, json_key, valid_fraction = _TOK
    texts = []
    if kind == "json":
        for number, line in enumerate(payload, first):
            if not line.strip():
                continue
            try:
                text = json.loads(line).get(json_key)
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{number}: no string field {json_key!r} (--json-key)")
            texts.append(text)
    else:
        for path, text in payload:
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}: column {json_key!r} holds {type(text).__name__}, not text")
            texts.append(text or "")
    kept = [t for t in texts if t]
    held = [bool(valid_fraction) and is_valid_doc(t, valid_fraction) for t in kept]
    ids = tok.encode(kept)
    train = _pack([x for x, h in zip(ids, held) if not h], tok.eod_id, dtype)
    valid = _pack([x for x, h in zip(ids, held) if h], tok.eod_id, dtype)
    return (*train, *valid, len(texts) - len(kept))


def worker_tokenizer():
    """This process's tokenizer, as init_worker loaded it."""
    return _TOK[0]
