"""Local Hugging Face tokenizer directories: loading, identity for manifests, and a small BPE trainer.

The identity is the sha256 of `tokenizer.json` re-serialized canonically (sorted keys, no whitespace), so
the same tokenizer saved twice compares equal while any change to vocab, merges, normalizer or special
tokens does not. The directory name is kept for messages only.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

EOD_FALLBACK = "<|endoftext|>"


def _tokenizer_json(tokenizer_dir: str) -> str:
    """The fast tokenizer's JSON; directories without tokenizer.json are converted through transformers."""
    if not os.path.isdir(tokenizer_dir):
        raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist")
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=True)
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"{tokenizer_dir}: no tokenizer.json and no fast tokenizer could be built from it")
    return tok.backend_tokenizer.to_str()


def _identity(tokenizer_dir: str, text: str, tok) -> dict:
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "name": os.path.basename(os.path.normpath(tokenizer_dir)),
        "sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
    }


def tokenizer_identity(tokenizer_dir: str) -> dict:
    """{"name", "sha256", "vocab_size"} as recorded in manifests."""
    from tokenizers import Tokenizer

    text = _tokenizer_json(tokenizer_dir)
    return _identity(tokenizer_dir, text, Tokenizer.from_str(text))


def _configured_eos(tokenizer_dir: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(tokenizer_dir, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                return eos
    return None


@dataclass
class LoadedTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    eod_id: int
    eod_token: str
    identity: dict

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without special tokens (EOD is appended by the writer)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


def load_tokenizer(tokenizer_dir: str, eod_token: str | None = None) -> LoadedTokenizer:
    """The tokenizer and its EOD id: `eod_token` if given, else the configured eos_token, else <|endoftext|>."""
    from tokenizers import Tokenizer

    text = _tokenizer_json(tokenizer_dir)
    tok = Tokenizer.from_str(text)
    candidates = [eod_token] if eod_token else [_configured_eos(tokenizer_dir), EOD_FALLBACK]
    for name in candidates:
        if name is not None and tok.token_to_id(name) is not None:
            return LoadedTokenizer(tok, tok.token_to_id(name), name, _identity(tokenizer_dir, text, tok))
    raise ValueError(f"{tokenizer_dir}: cannot find the EOD token (tried {[c for c in candidates if c]}); "
                     "pass --eod-token")


def train_bpe_tokenizer(files: list[str], vocab_size: int, out_dir: str, eod_token: str = EOD_FALLBACK) -> str:
    """Train a byte-level BPE on text files and save it as a Hugging Face tokenizer directory (for tests/demos).

    Byte-level means every string round-trips exactly: decode(encode(text)) == text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eod_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(f) for f in files], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eod_token).save_pretrained(out_dir)
    return out_dir
