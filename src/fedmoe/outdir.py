"""The output folder of ``fedmoe run``: checked before anything loads, cleaned up after a failure.

- ``--out`` must be a new or empty folder that can be written; a folder holding an earlier run
  is replaced only with ``--overwrite`` (and only if it is a run directory: a folder with other
  files is never emptied), so a fresh run never inherits another run's checkpoints or files.
- ``--resume DIR`` needs ``DIR/config.toml`` and a checkpoint.
- After a failure, a folder this command created is removed — unless it holds a checkpoint
  (the run can be resumed) or the run stopped on purpose; such a folder keeps ``INCOMPLETE``
  (the reason) until a later ``--resume`` finishes it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fedmoe.errors import ConfigError, RunStopped

INCOMPLETE = "INCOMPLETE"
#: files whose presence marks a folder as a fedmoe run directory
RUN_MARKERS = ("rounds.jsonl", "summary.json", "checkpoints")


def _is_run_dir(out: Path) -> bool:
    return any((out / m).exists() for m in RUN_MARKERS)


def prepare_out(out: Path, overwrite: bool = False) -> bool:
    """Check (and create) ``out``; returns True when this call created it (or emptied it)."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder.", "pass a new folder name with --out.")
    created = not out.exists()
    if not created and any(out.iterdir()):
        names = ", ".join(sorted(p.name for p in out.iterdir())[:4])
        if not overwrite:
            raise ConfigError(f"--out {out} is not empty (holds {names}).",
                              f"choose a new folder, continue that run with `fedmoe run --resume {out}`, "
                              "or replace it with --overwrite.")
        if not _is_run_dir(out):
            raise ConfigError(f"--out {out} holds files that are not a fedmoe run ({names}); --overwrite replaces "
                              "only run directories.", "choose a new or empty folder for --out.")
        shutil.rmtree(out)
        created = True
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fedmoe-write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise ConfigError(f"--out {out} cannot be written ({exc.strerror or exc}).",
                          "choose a folder you can write, on a disk with free space.") from None
    return created


def check_resume_dir(run_dir: Path) -> None:
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"--resume {run_dir} is not a run directory (no config.toml).",
                          "pass the --out folder of a run that `fedmoe run` started.")
    if not (run_dir / "checkpoints" / "LATEST").is_file():
        raise ConfigError(f"Run directory {run_dir} has no checkpoint to resume from.",
                          f"start it again: `fedmoe run {run_dir / 'config.toml'} --out NEW_DIR`.")


def after_failure(out: Path, created: bool, exc: BaseException) -> None:
    """Leave nothing that could be mistaken for a result (see the module docstring)."""
    if not out.is_dir():
        return
    resumable = (out / "checkpoints" / "LATEST").is_file()
    if created and not resumable and not isinstance(exc, RunStopped):
        shutil.rmtree(out, ignore_errors=True)
        return
    try:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
        (out / INCOMPLETE).write_text(f"this run did not finish: {reason}\ncontinue it with "
                                      f"`fedmoe run --resume {out}`\n")
    except OSError:
        pass
