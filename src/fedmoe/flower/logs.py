"""Flower's own logger, made quiet for fedmoe runs (lives here: only fedmoe.flower imports flwr)."""

from __future__ import annotations

import logging

#: Flower log records a fedmoe user cannot act on (substrings of the message)
FLOWER_NOISE = ("The `run_simulation` function is deprecated",)


class _DropFlowerNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in FLOWER_NOISE)


def quiet_flower(stream_is_tty: bool) -> None:
    """Flower's logger for an in-process simulation: INFO, each record once (not again through
    the root logger), no colour codes unless the stream is a terminal, and without the
    deprecation notice of ``run_simulation`` (the only in-process simulation API of flwr 1.x;
    ``flwr run`` is the supported path for deployments, see docs/deploy.md)."""
    from flwr.common.logger import FLOWER_LOGGER, update_console_handler

    update_console_handler(level=logging.INFO, colored=stream_is_tty)
    FLOWER_LOGGER.propagate = False
    if not any(isinstance(f, _DropFlowerNoise) for f in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(_DropFlowerNoise())
    for h in FLOWER_LOGGER.handlers:
        if not any(isinstance(f, _DropFlowerNoise) for f in h.filters):
            h.addFilter(_DropFlowerNoise())
