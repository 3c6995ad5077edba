"""Benchmark material built from the real recordings in ``../shared/data``.

No long recording with a transcript exists there, so long-form sets stitch the
clips in a fixed order with silence between them (see shared/data/README.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
REPO = Path(__file__).resolve().parents[3]  # murmur/eval/bench/dataset.py -> the repo

AMI_SESSIONS = ("dev00", "dev01", "trn01", "trn02", "trn03", "trn04", "trn05",
                "trn06", "trn07", "trn08", "trn09", "tst00", "tst01")
PARTS = ("ljspeech", "ami", "ted", "sonnets", "jfk")


@dataclass
class Item:
    name: str
    audio: np.ndarray  # float32, 16 kHz, mono
    reference: str  # "" when there is none
    ref_segments: list[dict] | None = None  # SegLST (AMI only), absolute times
    duration: float = 0.0
    # where each source clip sits in ``audio``: dict(name, part, start, end, reference)
    clips: list[dict] = field(default_factory=list)
    # who speaks when, (start, end, speaker) (AMI only, ami30.rttm): every vocalisation, also
    # speakers without words, so DER and speaker counts use these rather than the SegLST
    ref_turns: list[tuple[float, float, str]] | None = None


# --------------------------------------------------------------------------- paths

def data_dir() -> Path:
    """MURMUR_DATA, else <repo>/../shared/data, else ./../shared/data."""
    tried = []
    env = os.environ.get("MURMUR_DATA")
    if env:
        tried.append(Path(env))
    tried += [REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    for p in tried:
        if p.is_dir():
            return p.resolve()
    raise FileNotFoundError(
        "benchmark data not found; set MURMUR_DATA or put it at ../shared/data. Tried: "
        + ", ".join(str(p) for p in tried))


# --------------------------------------------------------------------------- decoding

def _pyav_load(path: Path) -> np.ndarray:
    # Fallback decoder: s16 mono 16 kHz through libswresample, as whisper's ffmpeg call.
    import av

    out = []
    with av.open(str(path), metadata_errors="ignore") as c:
        rs = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in c.decode(audio=0):
            for f in rs.resample(frame):
                out.append(f.to_ndarray().reshape(-1))
        for f in rs.resample(None):  # flush the resampler's tail
            out.append(f.to_ndarray().reshape(-1))
    return np.concatenate(out).astype(np.float32) / 32768.0


@lru_cache(maxsize=None)
def _load(path: str) -> np.ndarray:
    """Decode once per process; the array is read-only because it is shared."""
    try:
        from murmur.audio.decode import load_audio
    except Exception:  # murmur.audio.decode absent or broken: keep benchmarks usable
        load_audio = _pyav_load
    a = np.ascontiguousarray(load_audio(Path(path)), dtype=np.float32)
    a.setflags(write=False)
    return a


def _item(name: str, path: Path, reference: str, ref_segments=None, part=None) -> Item:
    audio = _load(str(path))
    dur = len(audio) / SAMPLE_RATE
    ref = " ".join(reference.split())
    return Item(name, audio, ref, ref_segments, dur,
                [dict(name=name, part=part or name, start=0.0, end=dur, reference=ref)])


# --------------------------------------------------------------------------- sets

def ljspeech_items() -> list[Item]:
    d = data_dir() / "ljspeech"
    items = []
    for line in (d / "ljspeech.psv").read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        uid, text = line.split("|", 1)
        items.append(_item(uid, d / f"{uid}.flac", text, part="ljspeech"))
    return items


@lru_cache(maxsize=1)
def _ami_segments() -> dict[str, list[dict]]:
    segs = json.loads((data_dir() / "ami" / "ami30.seglst.json").read_text(encoding="utf-8"))
    by = {}
    for s in segs:
        by.setdefault(s["session_id"], []).append(s)
    # the file is not sorted within every session (trn07, trn08); sort is stable on ties
    return {k: sorted(v, key=lambda s: s["start_time"]) for k, v in by.items()}


@lru_cache(maxsize=1)
def _ami_turns() -> dict[str, list[tuple[float, float, str]]]:
    from murmur.eval.scoring import read_turns

    return read_turns(data_dir() / "ami" / "ami30.rttm")


def ami_items() -> list[Item]:
    d = data_dir() / "ami"
    items = []
    for sess in AMI_SESSIONS:
        segs = [dict(s) for s in _ami_segments().get(sess, [])]
        ref = " ".join(s["words"] for s in segs)
        it = _item(sess, d / f"{sess}.flac", ref, segs, part="ami")
        it.ref_turns = list(_ami_turns().get(sess, []))
        items.append(it)
    return items


def ted_item() -> Item:
    d = data_dir() / "ted"
    return _item("ted", d / "bill_gates-TED.mp3",
                 (d / "bill_gates-TED.txt").read_text(encoding="utf-8"))


def sonnet_items() -> list[Item]:
    # References keep the heading numeral (I, II, III) as shipped.
    d = data_dir() / "sonnets"
    return [_item(p, d / f"{p}.mp3", (d / f"{p}.txt").read_text(encoding="utf-8"),
                  part="sonnets")
            for p in ("p001", "p002", "p003")]


def jfk_item() -> Item:
    d = data_dir() / "jfk"
    return _item("jfk", d / "jfk.flac", (d / "jfk.txt").read_text(encoding="utf-8"))


_BUILDERS = {
    "ljspeech": ljspeech_items,
    "ami": ami_items,
    "ted": lambda: [ted_item()],
    "sonnets": sonnet_items,
    "jfk": lambda: [jfk_item()],
}


def _concat(name: str, items: list[Item], gap_s: float) -> Item:
    gap = np.zeros(int(round(gap_s * SAMPLE_RATE)), np.float32)
    chunks, refs, segs, clips, turns = [], [], [], [], []
    has_segs = has_turns = False
    pos = 0  # in samples, so offsets match the audio exactly
    for i, it in enumerate(items):
        if i:
            chunks.append(gap)
            pos += len(gap)
        off = pos / SAMPLE_RATE
        chunks.append(it.audio)
        if it.reference:
            refs.append(it.reference)
        if it.ref_segments is not None:
            has_segs = True
            for s in it.ref_segments:
                s = dict(s)
                # one recording now: session is the stitched name, speakers stay per-meeting
                s["speaker"] = f"{s['session_id']}_{s['speaker']}"
                s["session_id"] = name
                s["start_time"] = round(s["start_time"] + off, 3)
                s["end_time"] = round(s["end_time"] + off, 3)
                segs.append(s)
        if it.ref_turns is not None:
            has_turns = True
            turns += [(a + off, b + off, f"{it.name}_{k}") for a, b, k in it.ref_turns]
        for c in it.clips:
            clips.append(dict(c, start=c["start"] + off, end=c["end"] + off))
        pos += len(it.audio)
    audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return Item(name, audio, " ".join(refs), segs if has_segs else None,
                len(audio) / SAMPLE_RATE, clips, turns if has_turns else None)


def stitched(parts=("ljspeech", "ami", "ted", "sonnets"), gap_s: float = 1.0,
             repeat: int = 1) -> Item:
    """Clips of ``parts`` in that order, ``gap_s`` of silence between every two
    clips (also between loops), the whole sequence looped ``repeat`` times.

    Duration = repeat * (sum of clips) + (repeat * n_clips - 1) * gap.
    """
    unknown = [p for p in parts if p not in _BUILDERS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {PARTS}")
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    items = [it for p in parts for it in _BUILDERS[p]()]
    name = f"stitched[{'+'.join(parts)}]" + (f"x{repeat}" if repeat > 1 else "")
    return _concat(name, items * repeat, gap_s)


def stitched_ami(gap_s: float = 1.0) -> Item:
    """The 13 AMI clips back to back (~6.5 min) with a SegLST reference."""
    it = stitched(("ami",), gap_s)
    it.name = "stitched_ami"
    for s in it.ref_segments:
        s["session_id"] = it.name
    return it


def noref_15min(gap_s: float = 0.0) -> Item:
    """librispeech_other_noref (100 utterances, then the interview), ~15 min, no reference.

    For speed/memory/robustness only. No gap by default: utterances carry their own pauses.
    """
    d = data_dir() / "librispeech_other_noref"
    files = sorted(d.glob("*/*.flac"), key=lambda p: p.name) + sorted(d.glob("*.mp3"))
    items = [Item(p.stem, _load(str(p)), "", None, 0.0,
                  [dict(name=p.stem, part="noref", start=0.0,
                        end=len(_load(str(p))) / SAMPLE_RATE, reference="")])
             for p in files]
    return _concat("noref_15min", items, gap_s)
