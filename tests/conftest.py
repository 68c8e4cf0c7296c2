from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FIXTURES = ROOT.parent / "shared" / "fixtures" / "reference"


def example_specs() -> list[Path]:
    """Model specs under examples/ (experiment specs in examples/experiments/ are not)."""
    return sorted(
        p
        for p in EXAMPLES.rglob("*")
        if p.suffix in (".yaml", ".yml", ".json")
        and "experiments" not in p.relative_to(EXAMPLES).parts
    )


def tiny_specs() -> list[Path]:
    return sorted((EXAMPLES / "tiny").glob("*.yaml"))


@pytest.fixture
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.skip(f"reference fixtures not found at {FIXTURES}")
    return FIXTURES
