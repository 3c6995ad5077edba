"""Render a Transcript as txt, json, srt, vtt, seglst, stm or rttm."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import TextIO

from murmur.errors import MurmurError
from murmur.types import Segment, Transcript

FORMATS = ("txt", "json", "srt", "vtt", "seglst", "stm", "rttm")
DEFAULT_SPEAKER = "spk0"


def timestamp(seconds: float, sep: str = ",") -> str:
    """HH:MM:SS<sep>mmm; sep is "," for SRT and "." for WebVTT."""
    ms = max(0, round(seconds * 1000))  # round once, so 1.9995 s becomes 00:00:02,000
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def session_id(transcript: Transcript) -> str:
    return Path(transcript.source).stem if transcript.source else "session"


def _token(s: str) -> str:
    # STM and RTTM are whitespace-separated columns: a space inside a name would shift them
    return re.sub(r"\s+", "_", s.strip()) or "_"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cue_text(seg: Segment) -> str:
    text = _one_line(seg.text)
    return f"[{seg.speaker}] {text}" if seg.speaker is not None else text


def _txt(t: Transcript) -> str:
    return "".join(_cue_text(s) + "\n" for s in t.segments)


def _json(t: Transcript) -> str:
    return json.dumps(t.to_dict(), ensure_ascii=False, indent=2) + "\n"


def _cues(t: Transcript, sep: str) -> list[str]:
    # empty cues are invalid in many players, so segments without text are dropped
    segs = [s for s in t.segments if s.text.strip()]
    return [f"{timestamp(s.start, sep)} --> {timestamp(s.end, sep)}\n{_cue_text(s)}\n" for s in segs]


def _srt(t: Transcript) -> str:
    return "\n".join(f"{i}\n{cue}" for i, cue in enumerate(_cues(t, ","), 1))


def _vtt(t: Transcript) -> str:
    return "\n".join(["WEBVTT\n", *_cues(t, ".")])


def seglst(t: Transcript) -> list[dict]:
    """One meeteval SegLST entry per segment; a recording with no speech gets one entry with empty
    words, so it still names its session (meeteval refuses a set that lacks one)."""
    sid = session_id(t)
    return [
        {"session_id": sid, "speaker": s.speaker if s.speaker is not None else DEFAULT_SPEAKER,
         "start_time": round(s.start, 3), "end_time": round(s.end, 3), "words": _one_line(s.text)}
        for s in t.segments
    ] or [{"session_id": sid, "speaker": DEFAULT_SPEAKER, "start_time": 0.0, "end_time": 0.0, "words": ""}]


def _seglst(t: Transcript) -> str:
    return json.dumps(seglst(t), ensure_ascii=False, indent=1) + "\n"


def _stm(t: Transcript) -> str:
    return "".join(
        f"{_token(e['session_id'])} 1 {_token(e['speaker'])} {e['start_time']:.3f} {e['end_time']:.3f} {e['words']}".rstrip()
        + "\n"
        for e in seglst(t)
    )


def _rttm(t: Transcript) -> str:
    turns = [(x.start, x.end, x.speaker) for x in t.turns] or [
        (s.start, s.end, s.speaker) for s in t.segments if s.speaker is not None]
    sid = _token(session_id(t))
    return "".join(
        f"SPEAKER {sid} 1 {start:.3f} {max(0.0, end - start):.3f} <NA> <NA> {_token(spk)} <NA> <NA>\n"
        for start, end, spk in turns
    )


_RENDERERS = {"txt": _txt, "json": _json, "srt": _srt, "vtt": _vtt,
              "seglst": _seglst, "stm": _stm, "rttm": _rttm}


def render(transcript: Transcript, fmt: str) -> str:
    try:
        fn = _RENDERERS[fmt]
    except KeyError:
        raise MurmurError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}") from None
    return fn(transcript)


def write(transcript: Transcript, fmt: str, out: TextIO) -> None:
    out.write(render(transcript, fmt))


def write_file(transcript: Transcript, fmt: str, path_or_dash: str | Path) -> None:
    """Write to a file, or to stdout when the path is "-"."""
    text = render(transcript, fmt)  # render first: a bad format must not leave an empty file behind
    if str(path_or_dash) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        with open(path_or_dash, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    except OSError as e:
        raise MurmurError(f"cannot write {path_or_dash}: {e.strerror or e}") from None
