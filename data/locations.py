"""Where shards are: local paths, URLs and `pipe:` commands, as a manifest names them, and which of them a
manifest may name at all (check_shard_locations: a manifest is data, never a command unless allowed)."""

from __future__ import annotations

import os
import re

from data.errors import ManifestError

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
DATA_SCHEMES = ("http", "https", "s3", "gs")  # what a manifest may name: opened without a shell, by URL alone


def is_remote(location: str) -> bool:
    return location.startswith("pipe:") or bool(_URL.match(location))


def resolve(manifest_location: str, path: str) -> str:
    """A shard path as written in a manifest -> something `data.streams.open_stream` opens."""
    if is_remote(path) or os.path.isabs(path):
        return path
    if manifest_location.startswith("pipe:"):
        raise ManifestError(f"{manifest_location}: relative shard path {path!r} in a manifest read through "
                            "pipe: cannot be resolved; give the manifest as a URL (s3://, https://) or a local file, "
                            "or write absolute shard paths")
    if _URL.match(manifest_location):
        return manifest_location.rsplit("/", 1)[0] + "/" + path
    return os.path.join(os.path.dirname(manifest_location), path)


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
