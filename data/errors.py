"""The two errors of the data pipeline: a bad shard, a bad manifest. Each message names the file."""

from __future__ import annotations


class ShardError(RuntimeError):
    """A shard that cannot be read, or does not match its manifest entry; the message names the shard."""


class ManifestError(ValueError):
    """A manifest that is missing, malformed or inconsistent; the message names the manifest."""
