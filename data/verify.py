"""Re-read one shard of a manifest and check it against the manifest: the check behind
`tools/inspect_shards.py --verify` and `tools/merge_manifests.py --verify` (docs/DATA.md)."""

from __future__ import annotations

import hashlib

from data.chunks import iter_chunks
from data.errors import ShardError


def verify_shard(args) -> str | None:
    """None if shard `index` is good, else the error (which names the shard).

    `args` is one tuple (manifest, index, vocab_size), so that a process pool can map it; the read checks
    the tar structure, complete .tokens/.lengths chunks, EOD endings, the counts and (with vocab_size)
    every token id; the bytes read must hash to the manifest's sha256.
    """
    manifest, index, vocab_size = args
    info, url = manifest.shards[index], manifest.shard_url(index)
    digest = hashlib.sha256()
    try:
        for _ in iter_chunks(url, info, manifest, vocab_size=vocab_size, digest=digest):
            pass
    except ShardError as e:
        return str(e)
    if digest.hexdigest() != info.sha256:
        return f"{url}: sha256 {digest.hexdigest()} does not match the manifest's {info.sha256}"
    return None
