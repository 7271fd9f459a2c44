"""The server's templates: wrapped sub-MoEs it reads and shapes client tensors with.

For every client turn the server needs a sub-MoE wrapped like the client's
(:meth:`~fedmoe.engine.trainables.Trainables.wrap`) to shape the download
(``for_client``), check the upload (``upload_state``) and unpack it (``to_update``). It never
trains it and only reads its trainable tensors' names, shapes and layout, which depend on the
number of experts kept per layer, not on which ones (the expert map is passed separately).

So for the plain :class:`~fedmoe.engine.trainables.Trainables` a template is built once per
tuple of per-layer expert counts (and LoRA settings) and reused: wrapping with peft costs
about as much as a client's forward pass on the tiny models, and the template's dense weights
share the global model's storage (:func:`~fedmoe.moe.slicing.extract` with ``share=True``).
Strategies with their own trainables (FLEx: client state) get a fresh template every time, as
before. :meth:`Run.use_model <fedmoe.engine.run.Run.use_model>` drops the cache with the model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from fedmoe.engine.trainables import Trainables
from fedmoe.moe.families import MoEFamily
from fedmoe.moe.slicing import extract

#: templates kept (least recently used dropped first); each holds copies of its kept experts'
#: fused rows and router rows plus its LoRA tensors (dense weights are shared with the model)
CAPACITY = 8


class TemplateCache:
    """Wrapped sub-MoEs of one global model, by per-layer expert counts."""

    def __init__(self, base: nn.Module, family: MoEFamily, capacity: int | None = None) -> None:
        self.base, self.family = base, family
        self.capacity = CAPACITY if capacity is None else capacity
        self._lru: OrderedDict[tuple, nn.Module] = OrderedDict()
        self.builds = 0  # templates built (tests and benchmarks)

    def get(self, trainables: Trainables, kept: list[list[int]]) -> nn.Module:
        """A template for a client keeping ``kept`` (never train or write it)."""
        if type(trainables) is not Trainables or self.capacity <= 0:
            self.builds += 1
            return trainables.wrap(extract(self.base, kept, self.family))
        key: tuple[Any, ...] = (trainables.finetune, trainables.lora, tuple(len(set(k)) for k in kept))
        template = self._lru.get(key)
        if template is None:
            self.builds += 1
            template = trainables.wrap(extract(self.base, kept, self.family, share=True))
            self._lru[key] = template
            while len(self._lru) > self.capacity:
                self._lru.popitem(last=False)
        self._lru.move_to_end(key)
        return template
