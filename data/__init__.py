"""Data pipeline (the format is docs/DATA.md).

The on-disk format: schema.py (constants, Manifest, ShardInfo), errors.py, locations.py (what a manifest may
name), streams.py (opening local, remote and pipe: locations), manifest_io.py, tar_reader.py, chunks.py
(reading a shard back, checked). Writing: writer.py; verifying a written shard: verify.py. Reading for
training: reader.py (packed, resumable, rank-split), blend.py (dataset weights), batch_ramp.py
(--rampup-batch-size), mock.py (synthetic data), all behind loader.py's one interface. Tokenizers: tokenizer.py.
"""

from __future__ import annotations

from data.loader import PretrainingData, build_pretraining_data, build_train_data, build_valid_data

__all__ = ["PretrainingData", "build_pretraining_data", "build_train_data", "build_valid_data"]
