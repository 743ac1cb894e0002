"""Tokenizers behind one small interface: ``encode(text, special=...)`` -> list of ids, ``decode(ids)``.

``HFTokenizer`` wraps a ``transformers`` tokenizer (a checkpoint folder's, or the one inside a GGUF file);
``ByteTokenizer`` maps UTF-8 bytes to ids 3..258 (0 pad, 1 begin, 2 end) for the tiny random models of
tests and smoke runs, which have no tokenizer of their own.
"""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    name = "bytes"
    vocab_size = 259
    bos_id = 1
    prefix_id = 1  # the begin token, what lm-eval puts before an empty context

    def encode(self, text: str, special: bool = True) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id, *ids] if special else ids

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, tok, name: str):
        self.tok, self.name = tok, name
        self.vocab_size = len(tok)
        # lm-eval's prefix for an empty context: the begin token, else the end-of-text token
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(self, text: str, special: bool = True) -> list[int]:
        """``special``: add the tokenizer's own special tokens (a begin token where it uses one), as
        lm-evaluation-harness does for contexts; continuations are encoded without."""
        return list(self.tok(text, add_special_tokens=special).input_ids)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])


def load_tokenizer(source: str):
    """The tokenizer that goes with ``models.loading.load_model(source)``."""
    from transformers import AutoTokenizer

    from .loading import TINY_RANDOM, smollm2_gguf

    if source == TINY_RANDOM:
        return ByteTokenizer()
    if source == "smollm2" or str(source).endswith(".gguf"):
        path = smollm2_gguf() if source == "smollm2" else Path(source)
        return HFTokenizer(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name), path.stem)
    from .loading import _resolve_folder

    folder = _resolve_folder(str(source), download=False)
    return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)), Path(str(source)).name)
