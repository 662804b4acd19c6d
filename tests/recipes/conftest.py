import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "examples" / "albef"))


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    """One shapes-world cache shared by the recipe tests."""
    return tmp_path_factory.mktemp("shapes_cache")
