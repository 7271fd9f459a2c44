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
import os
import sys
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

def filter_upstream_warnings() -> None:
    for message, category, module in UPSTREAM_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


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
    # `datasets` is imported only to read hub datasets (fedmoe.data.hub); importing it here would cost every
    # command ~0.3 s (pandas, pyarrow): its own environment switches do the same once it is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for name in ("peft", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _show_notices(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    from fedmoe.errors import DataNotice

    if issubclass(category, DataNotice):
        print(f"note: {message}", file=sys.stdout, flush=True)  # stderr is for errors
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def notices_as_lines() -> None:
    """Print fedmoe's own data notices (e.g. unusable rows dropped) as one ``note: …`` line each."""
    warnings.showwarning = _show_notices
