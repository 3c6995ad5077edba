"""`murmur bench-stream`: the shared recordings played in real time, several streams at once.

Each stream is a thread that feeds its recording as the real clock makes it due (all the audio that
arrived while the last update was computing goes in at once, as a socket would hand it over), so the
model's compute counts. Streams share one engine (murmur.stream.scheduler.SharedEngine). Reported
per policy and stream count: WER of the committed text against the reference and against the
offline default on the same audio, and the latency of each committed word: when it was emitted
minus when its audio ended (AMI: the manual word times; otherwise the offline transcript's forced
alignment), median and p90.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
TARGET_MEDIAN_S, TARGET_P90_S = 2.0, 3.5


@dataclass
class Clip:
    name: str
    audio: np.ndarray
    reference: str
    ref_words: list[tuple[str, float]] | None = None  # (word, end time) when manual times exist


def _norm(w: str) -> str:
    return re.sub(r"[^a-z0-9']", "", w.lower().replace("\u2019", "'")).strip("'")


def load_clips(names: list[str], max_seconds: float) -> list[Clip]:
    """Recordings for the bench: whole source clips of each set, up to max_seconds of them."""
    from murmur.eval.bench import dataset as ds
    out = []
    for name in names:
        if name == "ljspeech":
            item = ds.stitched(("ljspeech",), gap_s=1.0)
        elif name == "sonnets":
            item = ds.stitched(("sonnets",), gap_s=1.0)
        elif name == "ami":
            item = ds.stitched_ami(gap_s=1.0)
        elif name == "ted":
            item = ds.ted_item()
        elif name == "jfk":
            item = ds.jfk_item()
        else:
            raise SystemExit(f"bench-stream: unknown set {name!r} (ljspeech, ted, ami, sonnets, jfk)")
        clips = [c for c in item.clips if c["end"] <= max_seconds] or item.clips[:1]
        end = clips[-1]["end"]
        audio = np.asarray(item.audio[: int(round(end * SAMPLE_RATE))])
        ref = " ".join(c["reference"] for c in clips if c["reference"])
        ref_words = None
        if name == "ami":
            words = json.loads((ds.data_dir() / "ami" / "ami30.words.seglst.json").read_text())
            ref_words = []
            for c in clips:
                ws = sorted((w for w in words if w["session_id"] == c["name"]), key=lambda w: w["start_time"])
                ref_words += [(w["words"], c["start"] + w["end_time"]) for w in ws]
        out.append(Clip(name, audio, ref, ref_words))
    return out


def pad_seconds(raw: str) -> float | None:
    """--encoder-pad: seconds, or 'full' for the whole 30-s window."""
    if raw.strip().lower() == "full":
        return None
    try:
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'full', got {raw!r}") from None


def wait_seconds(raw: str) -> float | None:
    """--max-wait: seconds, or 'off' to commit only what updates agree on."""
    if raw.strip().lower() in ("off", "none"):
        return None
    try:
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds or 'off', got {raw!r}") from None


def _play(make, audio: np.ndarray, speed: float, piece_s: float, start: float, out: dict) -> None:
    st = make()
    piece = max(1, int(piece_s * SAMPLE_RATE))
    fed, n, emitted = 0, len(audio), []
    try:
        while fed < n:
            now = (time.monotonic() - start) * speed
            # speed 0: piece by piece as fast as it decodes (no backlog, so the same words every run)
            due = min(n, fed + piece) if speed <= 0 else min(n, int(now * SAMPLE_RATE) // piece * piece)
            if due <= fed:
                time.sleep(max(0.001, ((fed + piece) / SAMPLE_RATE - now) / speed))
                continue
            r = st.feed(audio[fed:due])
            fed = due
            t = (time.monotonic() - start) * speed
            emitted += [(w, t) for w in r.committed]
        r = st.close()
        t = (time.monotonic() - start) * speed
        emitted += [(w, t) for w in r.committed]
        out["words"] = emitted
        out["stats"] = st.stats
    except Exception as e:  # noqa: BLE001 - reported in the table, the other streams go on
        out["error"] = repr(e)


def latencies(emitted, ref_words: list[tuple[str, float]]) -> list[float]:
    """emission time - reference end time, for committed words matched to the reference."""
    hyp = [(_norm(w.word), t) for w, t in emitted if _norm(w.word)]
    ref = [(_norm(w), e) for w, e in ref_words if _norm(w)]
    sm = difflib.SequenceMatcher(None, [r[0] for r in ref], [h[0] for h in hyp], autojunk=False)
    return [hyp[b + k][1] - ref[a + k][1] for a, b, size in sm.get_matching_blocks() for k in range(size)]


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def main(args) -> int:
    from murmur.models.loading import get_model
    from murmur.eval.scoring import wer
    from murmur.stream.scheduler import SharedEngine
    from murmur.stream.transcriber import StreamingTranscriber, StreamOptions
    from murmur.transcribe import set_threads, transcribe

    set_threads(args.threads)
    loaded = get_model(args.model, "cpu", args.compute_type)
    clips = load_clips(args.sets.split(","), args.max_seconds)
    counts = [int(x) for x in str(args.streams).split(",")]
    policies = args.policies.split(",")
    rows = []
    for clip in clips:
        t0 = time.perf_counter()
        off = transcribe(clip.audio, loaded, word_timestamps=clip.ref_words is None)
        offline_s = time.perf_counter() - t0
        ref_words = clip.ref_words or [(w.word, w.end) for s in off.segments for w in s.words]
        off_wer = wer(clip.reference, off.text)["wer"]
        print(f"# {clip.name}: {len(clip.audio) / SAMPLE_RATE:.1f} s, offline default WER "
              f"{100 * off_wer:.2f} % in {offline_s:.1f} s", file=sys.stderr)
        for policy in policies:
            for k in counts:
                engine = SharedEngine(loaded, batch_size=max(8, k), recycle=args.recycle)
                opts = StreamOptions(policy=policy, step_s=args.step, frame_threshold=args.frame_threshold,
                                     agreement=args.agreement, encoder_pad_s=args.encoder_pad,
                                     max_wait_s=args.max_wait)
                outs = [dict() for _ in range(k)]
                start = time.monotonic() + 0.2
                threads = [threading.Thread(target=_play, args=(
                    lambda: StreamingTranscriber(loaded, opts, decoder=engine), clip.audio, args.speed,
                    args.piece, start, outs[i])) for i in range(k)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                engine.close()
                lat, wers, vs_off, errors = [], [], [], 0
                for o in outs:
                    if "error" in o:
                        errors += 1
                        continue
                    text = "".join(w.word for w, _ in o["words"])
                    wers.append(wer(clip.reference, text)["wer"])
                    vs_off.append(wer(off.text, text)["wer"])
                    if args.speed > 0:  # latency means something on the real clock only
                        lat += latencies(o["words"], ref_words)
                row = dict(set=clip.name, policy=policy, streams=k, encoder_pad_s=args.encoder_pad,
                           seconds=round(len(clip.audio) / SAMPLE_RATE, 1),
                           wer=_mean(wers), offline_wer=off_wer, wer_vs_offline=_mean(vs_off),
                           wer_rel=(_mean(wers) / off_wer - 1) if off_wer and wers else None,
                           median_s=_pct(lat, 50), p90_s=_pct(lat, 90), errors=errors,
                           words=sum(len(o.get("words", ())) for o in outs),
                           updates=sum(o.get("stats", {}).get("updates", 0) for o in outs),
                           update_s=_mean([(o["stats"]["decode_s"] + o["stats"]["align_s"]) / o["stats"]["updates"]
                                           for o in outs if o.get("stats", {}).get("updates")]))
                rows.append(row)
                print(_fmt(row), file=sys.stderr, flush=True)
    print(_table(rows))
    for policy in policies:
        ok = [r["streams"] for r in rows if r["policy"] == policy]
        held = [k for k in sorted(set(ok)) if all(
            r["median_s"] is not None and r["median_s"] <= TARGET_MEDIAN_S
            for r in rows if r["policy"] == policy and r["streams"] == k)]
        print(f"{policy}: largest stream count with median latency <= {TARGET_MEDIAN_S} s on every set: "
              f"{max(held) if held else 'none'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _f(x, scale=1.0, nd=2):
    return "-" if x is None else f"{x * scale:.{nd}f}"


def _fmt(r) -> str:
    return (f"{r['set']} {r['policy']} x{r['streams']}: WER {_f(r['wer'], 100)} % (offline {_f(r['offline_wer'], 100)} %,"
            f" vs offline {_f(r['wer_vs_offline'], 100)} %), latency median {_f(r['median_s'])} s p90 {_f(r['p90_s'])} s,"
            f" {r['words']} words, {_f(r['update_s'])} s an update, {r['errors']} errors")


def _table(rows) -> str:
    head = ("| set | policy | streams | WER % | offline WER % | rel. | WER vs offline % | median s | p90 s | words |"
            " s an update |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['set']} | {r['policy']} | {r['streams']} | {_f(r['wer'], 100)} | {_f(r['offline_wer'], 100)} | "
                     f"{_f(r['wer_rel'], 100, 1)} % | {_f(r['wer_vs_offline'], 100)} | {_f(r['median_s'])} | "
                     f"{_f(r['p90_s'])} | {r['words']} | {_f(r['update_s'])} |")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-stream", help="live transcription on the real clock: WER and word latency, many streams")
    p.add_argument("--sets", default="ljspeech,ted,ami", help="comma list of ljspeech, ted, ami, sonnets, jfk")
    p.add_argument("--max-seconds", type=float, default=90.0, help="whole source clips up to this long, per set")
    p.add_argument("--streams", default="1,2,4", help="simultaneous stream counts to try, e.g. 1,2,4,6")
    p.add_argument("--policies", default="local-agreement,align-att")
    p.add_argument("--step", type=float, default=0.5, help="seconds of audio between updates")
    p.add_argument("--encoder-pad", type=pad_seconds, default=None,
                   help="seconds of silence the encoder sees after the buffer, to encode less than the whole "
                        "30-s window (default: full)")
    p.add_argument("--agreement", type=int, default=2)
    p.add_argument("--frame-threshold", type=int, default=25)
    p.add_argument("--max-wait", type=wait_seconds, default=2.0,
                   help="local-agreement: commit a word this many seconds after its audio ended, agreed or not "
                        "('off': only when agreed)")
    p.add_argument("--recycle", action=argparse.BooleanOptionalAction, default=True,
                   help="verify each update's draft, the stream's previous hypothesis (the same words)")
    p.add_argument("--piece", type=float, default=0.1, help="seconds per piece of audio the client sends")
    p.add_argument("--speed", type=float, default=1.0, help="1 = real time (the measurement); >1 only to try it out; "
                   "0 = as fast as it decodes, for WER alone (no latency)")
    p.add_argument("--model", default="tiny.en")
    p.add_argument("--compute-type", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON of the rows")
    p.set_defaults(func=main)
