"""Where Murmur keeps what it derives from its inputs: $MURMUR_CACHE, else ~/.cache/murmur."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MURMUR_CACHE", Path.home() / ".cache" / "murmur"))


def write_atomic(path: Path, text: str) -> bool:
    """Write `text` to `path` through a temporary file, so a reader never sees half of it; False if
    the cache cannot be written (read-only home, full disk): callers then just skip caching."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
        return True
    except OSError:
        return False
