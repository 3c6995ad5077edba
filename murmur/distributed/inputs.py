"""What a batch job runs over: files, folders (searched for audio) and JSONL manifests, as items."""
from __future__ import annotations

import inspect
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
    options: dict = field(default_factory=dict)  # per-item transcribe() keyword arguments
    error: str | None = None


def _option_names() -> set[str]:
    from murmur.decoding import DecodingOptions
    from murmur.transcribe import transcribe
    names = {p for p in inspect.signature(transcribe).parameters if p not in ("audio", "model", "progress",
                                                                              "device", "compute_type")}
    return (names | set(DecodingOptions.__dataclass_fields__)) - {"options", "decode_kw", "encoder_hooks",
                                                                 "vad_options", "diarize_options"}


def item_options(raw: dict, where: str) -> dict:
    """A manifest line's options as transcribe() keyword arguments; an unknown key is an error, so a
    typo never runs the item with defaults."""
    allowed = _option_names()
    bad = sorted(set(raw) - allowed)
    if bad:
        raise MurmurError(f"{where}: unknown option(s) {', '.join(bad)}")
    out = dict(raw)
    if isinstance(out.get("temperature"), list):
        out["temperature"] = tuple(float(t) for t in out["temperature"])
    return out


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
            opts = item_options({k: v for k, v in rec.items() if k not in ("audio", "id")}, where)
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
