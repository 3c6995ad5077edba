"""Where Murmur keeps what it derives from its inputs: $MURMUR_CACHE, else ~/.cache/murmur; and the
per-model artefacts it ships (murmur/data) beside the user's retrained copies."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("MURMUR_CACHE", Path.home() / ".cache" / "murmur"))


PACKAGE_DATA = Path(__file__).resolve().parent / "data"


def model_files(kind: str, model_name: str, ext: str) -> tuple[Path, Path]:
    """(the user's file in the cache, the one shipped in murmur/data) of a per-model artefact, e.g.
    kind "duo", ext "json" -> duo_tiny.en.json; callers prefer the first where it exists."""
    key = Path(str(model_name)).name.replace(os.sep, "_") or "model"
    name = f"{kind}_{key}.{ext}"
    return cache_dir() / name, PACKAGE_DATA / name


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
