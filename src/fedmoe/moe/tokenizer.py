"""A byte-level tokenizer for the random ``tiny-<family>`` models (which have no vocabulary).

Ids: 0 = pad, 1 = eos, 2 = bos/cls, 3 = sep, byte b → b + 4 (clipped to the model's
vocabulary). It implements only what :mod:`fedmoe.train.batching` uses. It lives with the models (not in
``fedmoe.train``) because :func:`fedmoe.moe.models.load_model` returns it: ``moe`` never imports ``train``.
"""

from __future__ import annotations

PAD, EOS, CLS, SEP, OFFSET = 0, 1, 2, 3, 4


class ByteTokenizer:
    pad_token_id = PAD
    eos_token_id = EOS
    cls_token_id = CLS
    sep_token_id = SEP

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        top = self.vocab_size - 1
        return [min(b + OFFSET, top) for b in text.encode("utf-8")]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i - OFFSET for i in ids if OFFSET <= i < 256 + OFFSET)
        return data.decode("utf-8", errors="ignore")
