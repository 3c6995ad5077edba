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


@pytest.fixture(scope="session")
def tiny():
    """The bundled default model, loaded once per test session (get_model caches it)."""
    from murmur.models.loading import get_model
    from murmur.transcribe import set_threads
    set_threads()
    return get_model("tiny.en", "cpu")
