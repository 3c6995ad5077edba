"""Score transcripts: WER, cpWER and tcpWER through meeteval, DER through pyannote.metrics.

Every word metric sees text after Whisper's English normaliser, so casing,
punctuation, fillers (um, uh) and spelling variants do not count as errors.

Files read by `read_any` become SegLST-like dicts:
    {"session_id", "speaker", "start_time", "end_time", "words"}
with None where the format does not carry the field (speaker and times of a
plain-text file). A one-session hypothesis scored against a one-session
reference is matched to it whatever the session names are, so
`murmur eval dev00.txt ref.txt` works.
"""
from __future__ import annotations

import functools
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable

from murmur.errors import ReferenceError_

DEFAULT_SPEAKER = "spk0"
_KEYS = ("session_id", "speaker", "start_time", "end_time", "words")


# ---------------------------------------------------------------- normalising

@functools.lru_cache(maxsize=1)
def _normalizer():
    from whisper_normalizer.english import EnglishTextNormalizer
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    # the normaliser knows only ASCII apostrophes; references often use typographic ones
    text = text.replace("\u2019", "'").replace("\u2018", "'")
    return " ".join(_normalizer()(text).split())


# ------------------------------------------------------------------- reading

def _fail(path: Path, where: str | int | None, msg: str) -> ReferenceError_:
    loc = f"{path}:{where}" if where is not None else str(path)
    return ReferenceError_(f"{loc}: {msg}")


def _time(path: Path, where, name: str, value) -> float:
    try:
        if isinstance(value, bool):  # json true/false would pass float()
            raise ValueError
        t = float(value)
    except (TypeError, ValueError):
        raise _fail(path, where, f"{name} {value!r} is not a number") from None
    if not math.isfinite(t):
        raise _fail(path, where, f"{name} {value!r} is not a finite number")
    return t


def _times(path: Path, where, start, end) -> tuple[float, float]:
    s, e = _time(path, where, "start", start), _time(path, where, "end", end)
    if e < s:
        raise _fail(path, where, f"end {e} is before start {s}")
    return s, e


def _entry(session_id, speaker, start, end, words) -> dict:
    return dict(zip(_KEYS, (str(session_id), None if speaker is None else str(speaker), start, end, words)))


def _parse_text(path: Path, text: str) -> dict:
    return {"entries": [_entry(path.stem, None, None, None, " ".join(text.split()))]}


def _parse_json(path: Path, text: str) -> dict:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict) and "segments" in data:  # murmur's own --format json
        return _parse_murmur_json(path, data)
    if not isinstance(data, list):
        raise _fail(path, None, "expected a SegLST list of segments or a murmur JSON transcript")
    entries = []
    for i, d in enumerate(data):
        where = f"entry {i}"
        if not isinstance(d, dict):
            raise _fail(path, where, f"expected an object, got {type(d).__name__}")
        missing = [k for k in ("session_id", "words") if k not in d]
        if ("start_time" in d) != ("end_time" in d):
            missing.append("end_time" if "start_time" in d else "start_time")
        if missing:
            raise _fail(path, where, f"missing key(s) {', '.join(missing)}")
        if not isinstance(d["words"], str):
            raise _fail(path, where, "words must be a string")
        s, e = _times(path, where, d["start_time"], d["end_time"]) if "start_time" in d else (None, None)
        entries.append(_entry(d["session_id"], d.get("speaker"), s, e, d["words"]))
    return {"entries": entries}


def _parse_murmur_json(path: Path, data: dict) -> dict:
    sid, entries, turns = path.stem, [], []
    for i, seg in enumerate(data["segments"]):
        where = f"segment {i}"
        if not isinstance(seg, dict) or not {"start", "end", "text"} <= seg.keys():
            raise _fail(path, where, "a segment needs start, end and text")
        s, e = _times(path, where, seg["start"], seg["end"])
        entries.append(_entry(sid, seg.get("speaker"), s, e, seg["text"]))
    for i, t in enumerate(data.get("turns") or []):
        where = f"turn {i}"
        if not isinstance(t, dict) or not {"start", "end", "speaker"} <= t.keys():
            raise _fail(path, where, "a turn needs start, end and speaker")
        s, e = _times(path, where, t["start"], t["end"])
        turns.append(_entry(sid, t["speaker"], s, e, ""))
    return {"entries": entries, "turns": turns or None}


def _lines(text: str) -> Iterable[tuple[int, list[str], str]]:
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip() and not line.lstrip().startswith((";;", "#")):
            yield n, line.split(), line


def _parse_stm(path: Path, text: str) -> dict:
    entries = []
    for n, f, line in _lines(text):
        if len(f) < 5:
            raise _fail(path, n, f"STM needs at least 5 fields (session channel speaker start end [text]), got {len(f)}")
        s, e = _times(path, n, f[3], f[4])
        words = line.split(None, 5)[5] if len(f) > 5 else ""
        if words.startswith("<"):  # optional <label> column before the text
            words = words.split(">", 1)[1] if ">" in words else ""
        if words.strip().upper() == "IGNORE_TIME_SEGMENT_IN_SCORING":
            continue
        entries.append(_entry(f[0], f[2], s, e, " ".join(words.split())))
    return {"entries": entries}


def _parse_rttm(path: Path, text: str) -> dict:
    turns = []
    for n, f, _ in _lines(text):
        if f[0] != "SPEAKER":  # other RTTM record types (SPKR-INFO, LEXEME...) carry no turns
            continue
        if len(f) not in (9, 10):
            raise _fail(path, n, f"RTTM SPEAKER line needs 10 fields, got {len(f)}")
        start, dur = _time(path, n, "start", f[3]), _time(path, n, "duration", f[4])
        if dur < 0:
            raise _fail(path, n, f"negative duration {dur}")
        turns.append(_entry(f[1], f[7], start, start + dur, ""))
    return {"entries": turns, "turns": turns, "has_words": False}


_PARSERS = {"text": _parse_text, "json": _parse_json, "stm": _parse_stm, "rttm": _parse_rttm}
_EXTENSIONS = {".txt": "text", ".json": "json", ".stm": "stm", ".rttm": "rttm"}


def _detect(path: Path, text: str) -> str:
    if path.suffix.lower() in _EXTENSIONS:
        return _EXTENSIONS[path.suffix.lower()]
    if text.lstrip().startswith(("[", "{")):
        return "json"
    first = next(_lines(text), None)
    if first is None:
        return "text"
    f = first[1]
    if f[0] == "SPEAKER" and len(f) >= 9:
        return "rttm"
    try:
        float(f[3]), float(f[4])
        return "stm"
    except (IndexError, ValueError):
        return "text"


def _read(path: str | Path) -> dict:
    """{"format", "entries", "turns", "has_words"}; turns are entries with speaker and times."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise _fail(path, None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise _fail(path, None, "not UTF-8 text") from None
    fmt = _detect(path, text)
    r = {"format": fmt, "has_words": True, **_PARSERS[fmt](path, text)}
    if r.get("turns") is None:
        r["turns"] = [e for e in r["entries"] if e["speaker"] is not None and e["start_time"] is not None]
    return r


def read_any(path: str | Path) -> list[dict]:
    """Read plain text, SegLST / murmur JSON, STM or RTTM into SegLST-like dicts."""
    return _read(path)["entries"]


def read_turns(path: str | Path) -> dict[str, list[tuple[float, float, str]]]:
    """Speaker turns (start, end, speaker) per session, sorted by start, from any file read_any
    reads (RTTM, SegLST, STM)."""
    by: dict[str, list] = {}
    for t in _read(path)["turns"]:
        by.setdefault(t["session_id"], []).append((t["start_time"], t["end_time"], t["speaker"]))
    return {k: sorted(v) for k, v in by.items()}


# ------------------------------------------------------------- word metrics

def _stats(er) -> dict:
    d = {"wer": er.error_rate, "errors": er.errors, "length": er.length,
         "ins": er.insertions, "dele": er.deletions, "sub": er.substitutions}
    for k in ("missed_speaker", "falarm_speaker", "scored_speaker"):
        if getattr(er, k, None) is not None:
            d[k] = getattr(er, k)
    return d


def wer(ref_text: str, hyp_text: str) -> dict:
    """Single-stream WER after normalisation: dict(wer, errors, length, ins, dele, sub).

    wer is None when the normalised reference is empty."""
    from meeteval.wer.wer.siso import siso_word_error_rate
    return _stats(siso_word_error_rate(normalize(ref_text), normalize(hyp_text)))


def _sum(stats: list[dict]) -> dict:
    out = {k: sum(s.get(k, 0) for s in stats) for k in ("errors", "length", "ins", "dele", "sub")}
    out["wer"] = out["errors"] / out["length"] if out["length"] else None
    return out


def _seglst(entries: list[dict], times: bool):
    import meeteval.io
    keys = ("start_time", "end_time") if times else ()
    return meeteval.io.SegLST([
        {"session_id": e["session_id"], "speaker": e["speaker"] if e["speaker"] is not None else DEFAULT_SPEAKER,
         "words": normalize(e["words"]), **{k: e[k] for k in keys}}
        for e in entries
    ])


def _pad_missing(ref: list[dict], hyp: list[dict]) -> list[dict]:
    """A session the hypothesis lacks scores as all words deleted instead of meeteval refusing it."""
    have = {e["session_id"] for e in hyp}
    extra = have - {e["session_id"] for e in ref}
    if extra:
        raise ReferenceError_(f"hypothesis has sessions missing from the reference: {', '.join(sorted(extra))}")
    missing = dict.fromkeys(e["session_id"] for e in ref if e["session_id"] not in have)
    return hyp + [_entry(s, "<none>", 0.0, 0.0, "") for s in missing]


def _per_session(results: dict) -> dict:
    out = _stats(sum(results.values())) if results else _sum([])
    out["sessions"] = {k: _stats(v) for k, v in results.items()}
    return out


def cpwer(ref: list[dict], hyp: list[dict]) -> dict:
    """cpWER over all sessions (meeteval.wer.cpwer), with a "sessions" breakdown."""
    import meeteval.wer
    times = all(e["start_time"] is not None for e in ref + hyp)  # order segments by time when known
    return _per_session(meeteval.wer.cpwer(_seglst(ref, times), _seglst(_pad_missing(ref, hyp), times)))


def _quiet_meeteval() -> None:
    # meeteval's "mean word length > collar" check measures whole segments, not
    # words, so it fires on every long utterance: drop just that message.
    import logging
    log = logging.getLogger("preprocess")
    if not any(getattr(f, "_murmur", False) for f in log.filters):
        f = lambda rec: not rec.getMessage().startswith("The mean word length")  # noqa: E731
        f._murmur = True
        log.addFilter(f)


def tcpwer(ref: list[dict], hyp: list[dict], collar: float = 5.0) -> dict:
    """tcpWER (meeteval.wer.tcpwer): a hypothesis word only matches a reference
    word it lies within `collar` seconds of."""
    import meeteval.wer
    _quiet_meeteval()
    r = meeteval.wer.tcpwer(_seglst(ref, True), _seglst(_pad_missing(ref, hyp), True), collar=collar)
    return _per_session(r)


# ---------------------------------------------------------------------- DER

def _turn(t) -> tuple[float, float, str]:
    if isinstance(t, dict):
        return (t.get("start_time", t.get("start")), t.get("end_time", t.get("end")), t["speaker"])
    if isinstance(t, (tuple, list)):
        return tuple(t)
    return t.start, t.end, t.speaker  # murmur.types.Turn or Segment


def der(ref_turns, hyp_turns, collar: float = 0.25) -> dict:
    """DER of one session through pyannote.metrics.

    `collar` is md-eval's: seconds forgiven on EACH side of every reference
    boundary (md-eval -c 0.25, the figure papers report). pyannote's collar is
    the total width centred on the boundary (t - collar/2, t + collar/2, see
    pyannote.metrics.utils.UEMSupportMixin.extrude), so we pass 2 * collar.
    Overlapped speech is scored. The scored region is the span from the first
    to the last turn of either side (pyannote's own default, made explicit to
    silence its warning). Returns seconds plus the rate; der is None when the
    reference holds no speech.
    """
    from pyannote.core import Annotation, Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate

    def annotation(turns):
        ann = Annotation()
        for i, (s, e, spk) in enumerate(map(_turn, turns)):
            if e > s:
                ann[Segment(s, e), i] = spk
        return ann

    ref, hyp = annotation(ref_turns), annotation(hyp_turns)
    spans = [s for a in (ref, hyp) for s in a.get_timeline()]
    uem = Timeline([Segment(min(s.start for s in spans), max(s.end for s in spans))]) if spans else Timeline()
    metric = DiarizationErrorRate(collar=2 * collar, skip_overlap=False)
    d = metric(ref, hyp, uem=uem, detailed=True)
    return _der_stats(d["missed detection"], d["false alarm"], d["confusion"], d["total"])


def _der_stats(missed, fa, conf, total) -> dict:
    return {"der": (missed + fa + conf) / total if total > 0 else None,
            "missed": missed, "false_alarm": fa, "confusion": conf, "total": total}


# --------------------------------------------------------------- evaluation

def _speakers(entries: list[dict]) -> int:
    return len({e["speaker"] for e in entries if e["speaker"] is not None})


def _text(entries: list[dict]) -> str:
    if all(e["start_time"] is not None for e in entries):
        entries = sorted(entries, key=lambda e: e["start_time"])  # stable: overlapping speakers keep file order
    return " ".join(e["words"] for e in entries)


def _by_session(entries: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in entries:
        out.setdefault(e["session_id"], []).append(e)
    return out


def evaluate(hyp_path: str | Path, ref_path: str | Path, collar: float = 5.0, der_collar: float = 0.25,
             partial: bool = False) -> dict:
    """Score a hypothesis file against a reference file, per session and overall.

    Returns {"sessions": {id: row}, "overall": row, "collar", "der_collar"}; a row
    holds ref_speakers, hyp_speakers and wer / cpwer / tcpwer / der dicts, each
    None where the files lack what it needs (words, speakers, times, turns).
    A reference session the hypothesis lacks counts as all deleted, unless
    `partial`, which scores only the sessions the hypothesis has.
    """
    ref, hyp = _read(ref_path), _read(hyp_path)
    ref_ids = list(dict.fromkeys(e["session_id"] for e in ref["entries"] + ref["turns"]))
    hyp_ids = set(e["session_id"] for e in hyp["entries"] + hyp["turns"])
    if len(ref_ids) == 1 and len(hyp_ids) == 1 and hyp_ids != set(ref_ids):
        for e in hyp["entries"] + hyp["turns"]:  # may be the same dicts: renaming twice is harmless
            e["session_id"] = ref_ids[0]
        hyp_ids = set(ref_ids)
    if hyp_ids - set(ref_ids):
        raise ReferenceError_(f"{hyp_path}: sessions not in {ref_path}: {', '.join(sorted(hyp_ids - set(ref_ids)))}")
    if partial:
        ref_ids = [s for s in ref_ids if s in hyp_ids]
        ref = {**ref, **{k: [e for e in ref[k] if e["session_id"] in hyp_ids] for k in ("entries", "turns")}}

    words = ref["has_words"] and hyp["has_words"]
    speakers = words and all(e["speaker"] is not None for e in ref["entries"] + hyp["entries"])
    times = speakers and all(e["start_time"] is not None for e in ref["entries"] + hyp["entries"])
    diarized = bool(ref["turns"]) and bool(hyp["turns"])

    cp = cpwer(ref["entries"], hyp["entries"]) if speakers else None
    tcp = tcpwer(ref["entries"], hyp["entries"], collar) if times else None
    r_ses, h_ses = _by_session(ref["entries"]), _by_session(hyp["entries"])
    r_turns, h_turns = _by_session(ref["turns"]), _by_session(hyp["turns"])

    sessions = {}
    for sid in ref_ids:
        rs, hs = r_ses.get(sid, []), h_ses.get(sid, [])
        sessions[sid] = {
            "ref_speakers": _speakers(rs if ref["has_words"] else r_turns.get(sid, [])),
            "hyp_speakers": _speakers(hs if hyp["has_words"] else h_turns.get(sid, [])),
            "wer": wer(_text(rs), _text(hs)) if words else None,
            "cpwer": cp["sessions"][sid] if cp else None,
            "tcpwer": tcp["sessions"][sid] if tcp else None,
            "der": der(r_turns.get(sid, []), h_turns.get(sid, []), der_collar) if diarized else None,
        }
    rows = list(sessions.values())
    ders = [r["der"] for r in rows]
    overall = {
        "ref_speakers": None,  # a sum of per-session speaker counts means nothing
        "hyp_speakers": None,
        "wer": _sum([r["wer"] for r in rows]) if words else None,
        "cpwer": {k: v for k, v in cp.items() if k != "sessions"} if cp else None,
        "tcpwer": {k: v for k, v in tcp.items() if k != "sessions"} if tcp else None,
        # overall DER weights sessions by their scored speech time, as md-eval does over files
        "der": _der_stats(*(sum(d[k] for d in ders) for k in ("missed", "false_alarm", "confusion", "total")))
        if diarized else None,
    }
    return {"sessions": sessions, "overall": overall, "collar": collar, "der_collar": der_collar}


def format_table(results: dict) -> str:
    from rich.console import Console
    from rich.table import Table

    def pct(d, key="wer"):
        return "-" if not d or d[key] is None else f"{100 * d[key]:.1f}%"

    table = Table(title=f"tcpWER collar ±{results['collar']:g} s, DER collar ±{results['der_collar']:g} s",
                  title_justify="left")
    for name in ("session", "ref spk", "hyp spk", "words", "WER", "cpWER", "tcpWER", "DER"):
        table.add_column(name, justify="left" if name == "session" else "right")

    def row(name, r, **kw):
        length = r["wer"]["length"] if r["wer"] else None
        spk = ["-" if r[k] is None else str(r[k]) for k in ("ref_speakers", "hyp_speakers")]
        table.add_row(name, *spk, "-" if length is None else str(length),
                      pct(r["wer"]), pct(r["cpwer"]), pct(r["tcpwer"]), pct(r["der"], "der"), **kw)

    for sid, r in results["sessions"].items():
        row(sid, r)
    if len(results["sessions"]) > 1:
        table.add_section()
        row("overall", results["overall"], style="bold")
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None, force_terminal=False).print(table)
    return buf.getvalue()


def to_json(results: dict) -> str:
    return json.dumps(results, indent=2, default=_json_default)


def _json_default(o: Any):
    return float(o)  # meeteval may hand back Decimal
