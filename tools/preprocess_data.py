r"""Tokenize jsonl / parquet / plain-text files into tar shards + manifest.json (the format: docs/DATA.md).

    python tools/preprocess_data.py --input data/*.jsonl --tokenizer path/to/hf_tokenizer \
        --output-dir out/web [--shard-size 1GiB] [--workers 16] [--json-key text]

Inputs, by file name: *.jsonl / *.json / *.ndjson (optionally .gz): one JSON object per line, text under
--json-key; *.parquet: the --json-key column; anything else: plain text, the whole file is one document.
Empty documents are dropped. Workers tokenize batches; results are written in input order by this
process, so the output bytes depend only on the inputs and the flags, never on --workers.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.format import LENGTHS_DTYPE, TOKEN_DTYPES  # noqa: E402
from data.tokenizer import load_tokenizer  # noqa: E402
from data.writer import ShardWriter  # noqa: E402

BATCH_DOCS, BATCH_BYTES = 1024, 4 << 20
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1GiB', '512MiB', '1G' (binary), '1GB' (decimal), '65536' -> int."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r} (examples: 1GiB, 256MiB, 1048576)")
    number, unit, binary = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    decimal = unit and not binary and text.strip().lower().endswith("b")
    return int(float(number) * (1000 if decimal else 1024) ** power)


# --- reading inputs (main process) ------------------------------------------------------------------
def _kind(path: str) -> str:
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    return "parquet" if name.endswith(".parquet") else "text"


def _batches(paths: list[str], json_key: str):
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


# --- tokenizing (workers) --------------------------------------------------------------------------
_TOK = None


def _init_worker(tokenizer_dir: str, eod_token: str | None, dtype: str, json_key: str, parallel: bool) -> None:
    global _TOK
    if not parallel:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker process
    _TOK = (load_tokenizer(tokenizer_dir, eod_token), TOKEN_DTYPES[dtype], json_key)


def _encode(task) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch -> (tokens with EOD after each document, lengths, number of empty documents dropped)."""
    kind, path, first, payload = task
    tok, dtype, json_key = _TOK
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
    ids = tok.encode(kept)
    lengths = np.array([len(x) + 1 for x in ids], dtype=LENGTHS_DTYPE)
    tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype)
    pos = 0
    for x in ids:
        tokens[pos:pos + len(x)] = x
        tokens[pos + len(x)] = tok.eod_id
        pos += len(x) + 1
    return tokens, lengths, len(texts) - len(kept)


# --- main -----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="jsonl(.gz), parquet or text files")
    p.add_argument("--tokenizer", required=True, metavar="HF_DIR", help="local Hugging Face tokenizer directory")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="new or empty directory for shards + manifest")
    p.add_argument("--shard-size", type=parse_size, default=1 << 30, help="maximum shard size (default 1GiB)")
    p.add_argument("--chunk-tokens", type=parse_size, default=1 << 20,
                   help="tokens per tar sample (whole documents; default 1Mi)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--json-key", default="text", help="field (jsonl) or column (parquet) holding the text")
    p.add_argument("--dtype", choices=["auto", *TOKEN_DTYPES], default="auto",
                   help="token dtype; auto: uint16 when the vocab fits, else uint32")
    p.add_argument("--eod-token", default=None, help="EOD token (default: the tokenizer's eos_token)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> dict:
    for path in args.input:
        if not os.path.isfile(path):
            raise ValueError(f"--input {path}: not a file")
    if args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be >= 1")
    loaded = load_tokenizer(args.tokenizer, args.eod_token)
    vocab = loaded.identity["vocab_size"]
    dtype = args.dtype if args.dtype != "auto" else ("uint16" if vocab <= 1 << 16 else "uint32")
    if vocab > np.iinfo(TOKEN_DTYPES[dtype]).max + 1:
        raise ValueError(f"--dtype {dtype} cannot hold the {vocab} token ids of {args.tokenizer}")
    from tqdm import tqdm

    init = (args.tokenizer, args.eod_token, dtype, args.json_key, args.workers == 1)
    tasks = _batches(args.input, args.json_key)
    dropped = total = 0
    with ShardWriter(args.output_dir, tokenizer=loaded.identity, eod_id=loaded.eod_id, dtype=dtype,
                     shard_size=args.shard_size, chunk_tokens=args.chunk_tokens) as writer:
        if args.workers == 1:
            _init_worker(*init)
            results, pool = map(_encode, tasks), None
        else:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(args.workers, initializer=_init_worker, initargs=init)
            results = pool.imap(_encode, tasks)  # ordered: output independent of scheduling
        try:
            with tqdm(unit="doc", disable=args.quiet, file=sys.stderr, dynamic_ncols=True) as bar:
                for tokens, lengths, empty in results:
                    writer.add_documents(tokens, lengths)
                    dropped, total = dropped + empty, total + tokens.size
                    bar.update(lengths.size)
                    bar.set_postfix(tokens=f"{total:,}", refresh=False)
        finally:
            if pool is not None:
                pool.terminate()
        manifest = writer.close()
    return {"output": manifest.location, "shards": len(manifest.shards), "docs": manifest.total_docs,
            "tokens": manifest.total_tokens, "empty_docs_dropped": dropped, "dtype": dtype, "eod_id": loaded.eod_id}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, OSError) as e:
        print(f"preprocess_data: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
