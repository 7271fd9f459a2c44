"""Set-up shared by ``step_time.py`` and ``lora_step.py``: the dense MiniLM text classifier and
the seeded random batch both time their steps on."""

from __future__ import annotations

import torch
from torch import nn


class DenseTC(nn.Module):
    """Dense MiniLM + a Linear on [CLS]: the dense counterpart of the ``tc`` task."""

    def __init__(self, bert: nn.Module, labels: int = 4) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0])


def random_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids in ``[5, vocab)`` (full attention mask) and 4-class labels, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 4, (batch,), generator=g)}
