"""Compatibility name: the byte tokenizer lives in :mod:`fedmoe.moe.tokenizer` (``moe`` must not import ``train``)."""

from fedmoe.moe.tokenizer import CLS, EOS, OFFSET, PAD, SEP, ByteTokenizer

__all__ = ["CLS", "EOS", "OFFSET", "PAD", "SEP", "ByteTokenizer"]
