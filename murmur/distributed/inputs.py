"""What a batch job runs over: files, folders (searched for audio) and JSONL manifests, as items."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from murmur.errors import MurmurError

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".m4a", ".ogg", ".opus", ".aac", ".wma", ".aiff", ".aif",
                    ".mp4", ".mkv", ".mov", ".webm", ".avi"}
MANIFEST_EXTENSIONS = {".jsonl", ".ndjson"}


@dataclass
class Item:
    """One recording of the job. `error` set: the item is reported as such and never run."""
    id: str
    audio: str
    options: dict = field(default_factory=dict)  # the manifest's per-item options, as written
    error: str | None = None


def item_options(base, raw: dict):
    """`base` (a TranscribeOptions) with a manifest line's options over it. The line's text values
    parse as in TranscribeOptions.from_mapping, and an unknown key is an error (OptionsError), so a
    typo never runs the item with defaults."""
    from dataclasses import fields

    from murmur.options import _ALIASES, TranscribeOptions
    if not raw:
        return base
    parsed = TranscribeOptions.from_mapping(raw)
    own = {f.name for f in fields(TranscribeOptions)}
    kw = {}
    for key in raw:
        name = str(key).strip().replace("-", "_")
        name = _ALIASES.get(name, name)
        kw[name] = getattr(parsed, name) if name in own else getattr(parsed.decoding, name)
    return base.with_(**kw)


def safe_id(s: str) -> str:
    """An output file name: no path separators, no leading dot."""
    s = re.sub(r"[\\/\x00]+", "_", str(s).strip())
    return s.lstrip(".") or "_"


def _manifest(path: Path) -> list[Item]:
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        return [Item(safe_id(path.stem), str(path), error=f"cannot read manifest {path}: {e}")]
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict) or not isinstance(rec.get("audio"), str):
                raise MurmurError(f"{where}: expected an object with an \"audio\" path")
            audio = Path(rec["audio"])
            if not audio.is_absolute():
                audio = path.parent / audio  # relative to the manifest, so it can travel with its audio
            opts = {k: v for k, v in rec.items() if k not in ("audio", "id")}
            try:
                from murmur.options import TranscribeOptions
                item_options(TranscribeOptions(), opts)  # checked now: a bad line is reported, not run
            except MurmurError as e:
                raise MurmurError(f"{where}: {e}") from None
            items.append(Item(safe_id(rec.get("id") or audio.stem), str(audio), opts))
        except (ValueError, MurmurError) as e:
            msg = str(e) if isinstance(e, MurmurError) else f"{where}: not JSON ({e})"
            items.append(Item(safe_id(f"{path.stem}-line{n}"), str(path), error=msg))
    return items


def expand(inputs: list[str]) -> list[Item]:
    """Every recording the inputs name, in order. Bad inputs become items with an error (reported per
    item, never stopping the job); a repeated id is an error too, since both would write DIR/<id>.*"""
    items: list[Item] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            items += [Item(safe_id(f.stem), str(f)) for f in files]
        elif p.suffix.lower() in MANIFEST_EXTENSIONS and p.is_file():
            items += _manifest(p)
        else:
            items.append(Item(safe_id(p.stem), str(p)))  # missing or not audio: its decode says so
    seen: dict[str, str] = {}
    for n, it in enumerate(items):
        if it.id in seen:
            # renamed, so its error line never stands for the first one's outputs in the summary
            it.error = it.error or f"duplicate id {it.id!r} (also {seen[it.id]})"
            it.id = f"{it.id}~{n}"
        seen.setdefault(it.id, it.audio)
    return items
