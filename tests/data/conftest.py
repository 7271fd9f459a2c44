"""Fixtures for the data tests: the real shared data and cache control."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fedmoe.config import ExperimentConfig, load_config
from fedmoe.data import partition, source

#: the shared folder beside the repository root
REAL_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PRESETS = ["standard-hetero-t", "standard-hetero-td", "enforced-hetero-t", "enforced-hetero-td"]


@pytest.fixture(scope="session")
def real_data() -> Path:
    if not (REAL_DATA / "ag_news").is_dir():
        pytest.skip(f"real data absent: expected ag_news/, squad/, xsum/ under {REAL_DATA}")
    return REAL_DATA


def real_config(data_dir: Path, *overrides: str) -> ExperimentConfig:
    return load_config(None, [f"data.data_dir={str(data_dir)!r}", *overrides])


def clear_caches() -> None:
    """Forget loaded examples and clusters so the next build starts cold."""
    source._CACHE.clear()
    partition._CLUSTER_CACHE.clear()


@pytest.fixture
def cold() -> Iterator[None]:
    clear_caches()
    yield
