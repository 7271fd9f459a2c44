"""Compatibility name: the tokenizers live in :mod:`fedmoe.moe.tokenizer` (``moe`` must not import ``train``)."""

from fedmoe.moe.tokenizer import CLS, EOS, OFFSET, PAD, SEP, ByteTokenizer, char_wordpiece_tokenizer

__all__ = ["CLS", "EOS", "OFFSET", "PAD", "SEP", "ByteTokenizer", "char_wordpiece_tokenizer"]
