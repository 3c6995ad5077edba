from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def data_dir() -> Path:
    # real speech shared between checkouts, beside the repo: ../shared/data
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared speech data not found at {path}")
    return path


@pytest.fixture(scope="session")
def jfk_path(data_dir) -> Path:
    return data_dir / "jfk" / "jfk.flac"
