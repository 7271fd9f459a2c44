"""The fault-injection spec ``engine.inject_faults`` (tests and drills): its kinds and its parser.

A leaf module (it imports only :mod:`fedmoe.errors`), so that :mod:`fedmoe.config` can validate
the key without importing the engine; :mod:`fedmoe.engine.faults` applies the faults.
"""

from __future__ import annotations

from fedmoe.errors import ConfigError

#: injectable fault kinds: ``raise`` (the turn raises), ``timeout`` (the client hangs until its
#: deadline), ``nan`` (an uploaded tensor holds NaN), ``inf`` (… +Inf), ``shape`` (an uploaded
#: tensor has an extra row), ``extra_expert`` (a tensor for an expert the client was not given),
#: ``bad_p`` (routing statistics hold NaN), ``bad_extra`` (an algorithm extra — SCAFFOLD's Δc,
#: FLEx's e* — is NaN / out of range; without extras: a negative p), ``big_update`` (a finite
#: update far larger than training makes: caught by ``engine.max_update_norm``)
FAULT_KINDS = ("raise", "timeout", "nan", "inf", "shape", "extra_expert", "bad_p", "bad_extra", "big_update")


def parse_faults(text: str, key: str = "engine.inject_faults") -> dict[tuple[int, int], str]:
    """``"2:1, 3:4:nan"`` → ``{(2, 1): "raise", (3, 4): "nan"}`` (round, client id) → kind."""
    out: dict[tuple[int, int], str] = {}
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        parts = item.split(":")
        kind = parts[2].strip() if len(parts) == 3 else "raise"
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            rnd, cid = int(parts[0]), int(parts[1])
        except ValueError:
            raise ConfigError(f"`{key}` item `{item}` is not ROUND:CLIENT[:KIND].",
                              f'write it as e.g. "2:1" or "2:1:nan" (kinds: {", ".join(FAULT_KINDS)}).') from None
        if kind not in FAULT_KINDS:
            raise ConfigError(f"`{key}` item `{item}` has unknown fault kind `{kind}`.",
                              f"use one of: {', '.join(FAULT_KINDS)}.")
        out[(rnd, cid)] = kind
    return out
