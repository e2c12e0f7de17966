"""Reading and writing a manifest: load_manifest checks it (format, version, fields, counts, and shard
locations that would run a command), write_manifest replaces it atomically."""

from __future__ import annotations

import json
import os

from data.errors import ManifestError
from data.locations import check_shard_locations
from data.schema import FORMAT_NAME, FORMAT_VERSION, Manifest, ShardInfo
from data.streams import open_stream


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
