"""Quiet by default: upstream noise is silenced here, in one place, and nowhere else.

* :func:`filter_upstream_warnings` (installed when ``fedmoe`` is imported): warnings that
  upstream libraries raise about *their own* use of each other, which a fedmoe user cannot act
  on. Each filter names the exact message and the module that raises it; everything else
  (including warnings about the user's own input) still shows.
* :func:`quiet_cli` (the ``fedmoe`` command): no loading/saving progress bars from
  ``transformers`` / ``huggingface_hub`` / ``datasets`` (they are not ours and would leak into
  ``fedmoe inspect`` tables and logs), and upstream library loggers at ERROR.
"""

from __future__ import annotations

import logging
import warnings

#: (message regex, category, module regex) of upstream warnings a fedmoe user cannot act on
UPSTREAM_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # peft (0.17–0.21) reads transformers' deprecated alias in PeftModel.__init__
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\."),
    # peft checks a base folder for a vocabulary change when saving an adapter
    (r"Could not find a config file in", UserWarning, r"peft\."),
    # Ray, on every driver start: a tip about a future default for GPU-less actors
    (r"Tip: In future versions of Ray", FutureWarning, r"ray\."),
)

#: Flower log records a fedmoe user cannot act on (substrings of the message)
FLOWER_NOISE = ("The `run_simulation` function is deprecated",)


def filter_upstream_warnings() -> None:
    for message, category, module in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


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


def quiet_cli() -> None:
    """Silence upstream progress bars and chatty loggers (the CLI's own output stays)."""
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
    for name in ("peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
